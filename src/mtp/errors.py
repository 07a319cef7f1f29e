"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class MTPError(Exception):
    """Bad input: a missing file, a malformed record, a checkpoint that does not match, a prompt too long."""


class CheckpointMismatchError(MTPError):
    """A checkpoint's tensors do not match the model it is loaded into (names missing, extra or mis-shaped)."""


class NonFiniteLogitsError(MTPError):
    """The model computed NaN or infinite logits while decoding (damaged weights, or a dtype that overflows for this
    input): the model's fault, not the request's (`mtp serve` answers it with a 500)."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (errors from transformers and jinja span many; the CLI prints one)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
