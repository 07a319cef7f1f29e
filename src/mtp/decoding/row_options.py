"""What may differ between the rows of one batch: each row's sampling settings, penalties and stop strings.

A server's requests ask for different temperatures, penalties and stop strings; decoded as one batch, each row
keeps its own (vLLM's per-request sampling parameters). The values live in the decoding state, one row per batch
row (`DecodeState.sampling`, `DecodeState.penalties`, ...), and the stop strings in the host's `StopChecker`; what
the batch's steps compute is decided once for the batch (`batch_options`): they sample where a row samples (a
greedy row of such a batch is verified greedily, token for token what greedy decoding emits), filter by top-k
where a row asks for it, penalize where a row has penalties. A row that joins a running batch (`Admission`) may
ask for no more than that (`RowOptions.fits`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mtp.arguments import check_values
from mtp.decoding.penalties import Penalties, checked_bias
from mtp.errors import MTPError


@dataclass(frozen=True)
class RowOptions:
    """One row's settings (`generate`'s arguments of the same names, checked)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    penalties: Penalties = field(default_factory=Penalties)
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def of(cls, opts) -> RowOptions:
        """The options of a batch whose rows all decode as `opts` (a `DecodeOptions`) says."""
        return cls(opts.do_sample, opts.temperature, opts.top_k, opts.top_p, opts.min_p, opts.penalties or Penalties())

    @property
    def own_tokens(self) -> bool:
        """Whether the row emits only the model's own next tokens (greedy, no penalties): what heads that read the
        next token assume when they write their keys, unless the step reads the emitted ones
        (`Drafter.reads_emitted`, `mtp.decoding.prefixes.Starts.keep`)."""
        return not self.do_sample and not self.penalties.active

    def settings(self) -> list[float]:
        """The row of `DecodeState.sampling`: temperature (0: greedy), top-k, top-p, min-p (a greedy row's neutral)."""
        if not self.do_sample:
            return [0.0, 0.0, 1.0, 0.0]
        # (a top-k past any vocabulary keeps every token, as the vocabulary's size does: one of 400 digits would
        # overflow the float; 2**24 is still exact in float32)
        return [self.temperature, float(min(self.top_k, 1 << 24)), self.top_p, self.min_p]

    def fits(self, opts) -> bool:
        """Whether the row may decode in a batch whose steps `opts` (`batch_options`) shapes: what it asks for is
        among what they compute (a sampled row: a sampling batch with its filters, a top-k no larger than the
        batch's largest; penalties: a penalized one)."""
        if self.penalties.active and opts.penalties is None:
            return False
        if not self.do_sample:
            return True
        return opts.do_sample and self.top_k <= opts.top_k and (self.top_p >= 1.0 or opts.top_p < 1.0) \
            and (not self.min_p or opts.min_p > 0.0)


def batch_options(opts, rows: Sequence[RowOptions]):
    """`opts` (a `DecodeOptions`) with what the rows' steps compute, whose values are each row's in the state:
    sampling where a row samples (the first sampled row's temperature, which a custom proposer may read; the
    largest top-k and min-p and the smallest top-p: a filter runs where one is on), penalties where a row has any
    (the first such row's)."""
    sampled = [r for r in rows if r.do_sample]
    first = sampled[0] if sampled else RowOptions()
    penalties = next((r.penalties for r in rows if r.penalties.active), None)
    return dataclasses.replace(opts, do_sample=bool(sampled), temperature=first.temperature,
                               top_k=max((r.top_k for r in sampled), default=0),
                               top_p=min((r.top_p for r in sampled), default=1.0),
                               min_p=max((r.min_p for r in sampled), default=0.0), penalties=penalties)


PER_ROW = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
           "frequency_penalty", "logit_bias", "min_new_tokens", "stop_strings")
# Fields a JSON record of prompts (`mtp generate --prompts`) may set for its own prompt: max_new_tokens and PER_ROW's
# settings as JSON spells them ("stop": its stop strings; logit_bias is the run's)
RECORD_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "min_new_tokens", "stop")


def row_options(rows: int, vocab: int, values: Mapping[str, object], shared: Mapping[str, object]) -> list[RowOptions]:
    """Each row's options from `generate`'s arguments `values` (each one value for every row, or a list or tuple
    of one per row; `logit_bias`: a mapping or one per row; `stop_strings`: a list of strings or one list per
    row), checked with the call's other arguments `shared` (strategy, seed, ...); an MTPError says what is wrong."""
    expanded = {name: _per_row(name, value, rows) for name, value in values.items()}
    # Rows given the same objects (every row, where a value is one for all) share one checked RowOptions: a
    # thousand-row batch is checked once, not a thousand times (the objects stay alive in `expanded`, so their
    # ids name them)
    made: dict[tuple[int, ...], RowOptions] = {}
    out = []
    for row in range(rows):
        v = {name: each[row] for name, each in expanded.items()}
        key = tuple(map(id, v.values()))
        if key not in made:
            made[key] = _one_row(v, vocab, shared)
        out.append(made[key])
    return out


def _one_row(v: Mapping[str, object], vocab: int, shared: Mapping[str, object]) -> RowOptions:
    check_values({**shared, **{n: v[n] for n in PER_ROW if n not in ("logit_bias", "stop_strings")},
                  "logit_bias": v["logit_bias"] or None}, flags=False)
    penalties = Penalties(v["repetition_penalty"], v["presence_penalty"], v["frequency_penalty"],
                          checked_bias(v["logit_bias"], vocab), v["min_new_tokens"])
    strings = v["stop_strings"] or ()
    if isinstance(strings, str) or not all(isinstance(s, str) for s in strings):
        raise MTPError(f"stop_strings must be a list of strings (or one list per row), got {strings!r}")
    return RowOptions(bool(v["do_sample"]), v["temperature"], v["top_k"], v["top_p"], v["min_p"], penalties,
                      tuple(strings))


def row_arguments(rows: Sequence[RowOptions]) -> dict[str, list]:
    """`generate`'s per-row arguments (`PER_ROW`) that give these rows: what `row_options` reads back."""
    return dict(do_sample=[r.do_sample for r in rows], temperature=[r.temperature for r in rows],
                top_k=[r.top_k for r in rows], top_p=[r.top_p for r in rows], min_p=[r.min_p for r in rows],
                repetition_penalty=[r.penalties.repetition for r in rows],
                presence_penalty=[r.penalties.presence for r in rows],
                frequency_penalty=[r.penalties.frequency for r in rows],
                logit_bias=[dict(r.penalties.bias) for r in rows],
                min_new_tokens=[r.penalties.min_new_tokens for r in rows],
                stop_strings=[list(r.stop_strings) for r in rows])


def _per_row(name: str, value, rows: int) -> list:
    """`value` for each of `rows` rows: one value, or a list (tuple) of one per row."""
    # (a list of strings is every row's stop strings; a list of lists, one per row)
    each = isinstance(value, list | tuple) and (name != "stop_strings" or bool(value) and not isinstance(value[0], str))
    if not each:
        return [value] * rows
    if len(value) != rows:
        raise MTPError(f"{name} must be one value or one per row ({rows}), got {len(value)} values")
    return list(value)
