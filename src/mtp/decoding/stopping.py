"""Stop conditions applied to each step's emitted block: end tokens, stop strings, nothing past them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtp.errors import MTPError


def stop_tokens(emitted: torch.Tensor, counts: torch.Tensor, stop_ids: torch.Tensor):
    """Cut each row's emitted block (B, W) after its first end token among its first counts[b]; on the device.
    Returns (counts (B,), hit (B,) bool)."""
    if stop_ids.numel() == 0:
        return counts, torch.zeros_like(counts, dtype=torch.bool)
    if emitted.shape[1] == 1:  # one token (greedy): it ends the row if it is emitted and an end token (4 kernels)
        return counts, (emitted == stop_ids).any(-1) & (counts > 0)
    in_block = torch.arange(emitted.shape[1], device=emitted.device)[None, :] < counts[:, None]  # (B, W)
    hit = (emitted[..., None] == stop_ids).any(-1) & in_block  # (B, W); a few end tokens: a broadcast compare
    any_hit = hit.any(-1)
    return torch.where(any_hit, hit.long().argmax(-1) + 1, counts), any_hit


class StopChecker:
    """End tokens (checked on the device, in the step: `stop_ids`), stop strings (checked on the host, on the
    tokens each step emitted: `cut`) and the caller's own reason to end a row (`halt(row)`, asked after every
    step: a server's client that left)."""

    def __init__(self, batch_size: int, stop_token_ids: list[int] | None, stop_strings: list[str] | None,
                 tokenizer=None, device: torch.device | str = "cpu", halt: Callable[[int], bool] | None = None,
                 row_strings: list[tuple[str, ...]] | None = None, prompt_tails: list[list[int]] | None = None):
        """`stop_strings` end every row; `row_strings` (one tuple per row): each row's own (rows of requests that
        ask for different ones, decoded as one batch). `prompt_tails` (each row's last prompt tokens): a stop
        string may begin there and end in the new text (transformers' rule: the sequence's end matches; a
        server's, vLLM's and OpenAI's, matches the new text only)."""
        self.halt = halt
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
        shared = tuple(s for s in (stop_strings or []) if s)
        self.strings: list[tuple[str, ...]] = [shared] * batch_size if row_strings is None else \
            [tuple(s for s in strings if s) for strings in row_strings]
        if any(self.strings) and tokenizer is None:
            raise MTPError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.history: list[list[int]] = [[] for _ in range(batch_size)]  # only kept when stop strings are used
        self.tails = [list(t) for t in prompt_tails] if prompt_tails is not None else [[] for _ in range(batch_size)]
        self.tail_chars = [len(tokenizer.decode(t)) if t and tokenizer is not None else 0 for t in self.tails]

    def add_rows(self, strings: list[tuple[str, ...]]) -> None:
        """Rows that join the batch (continuous batching), after the others, with their stop strings."""
        if any(strings) and self.tokenizer is None:
            raise MTPError("stop strings need a tokenizer")
        self.strings.extend(tuple(s for s in row if s) for row in strings)
        self.history.extend([] for _ in strings)
        self.tails.extend([] for _ in strings)
        self.tail_chars.extend(0 for _ in strings)

    def cut(self, row: int, new: list[int]) -> int | None:
        """How many of `new` (row's tokens emitted this step) to keep when they complete a stop string (the
        shortest prefix that does), 0 when the caller halts the row; None when neither ends it."""
        if self.halt is not None and self.halt(row):
            return 0
        strings = self.strings[row]
        if not strings:
            return None
        hist = self.history[row]
        base = len(hist)
        hist.extend(new)
        # Only the tail can contain a new match: decode a window that covers the longest stop string. Counted in
        # bytes: a token holds one or more of its text's bytes, but a character may take several tokens (CJK or
        # an emoji in a byte-level BPE: a window of characters missed such a stop string, and decoding went on).
        window = max(len(s.encode("utf-8", "surrogatepass")) for s in strings) + 8 + len(new)
        if not self._matches(row, hist, len(hist), window):  # (one decode a step, not one per stop string)
            return None
        for j in range(base + 1, len(hist) + 1):
            if self._matches(row, hist, j, window):
                del hist[j:]
                return j - base
        return None

    def _matches(self, row: int, hist: list[int], end: int, window: int) -> bool:
        """Whether the row's text up to its token `end` holds a stop string: in the last `window` tokens' text,
        or (where those are all its new tokens) one that begins in its prompt's tail and ends after it."""
        tail = self.tails[row] if end <= window else []  # (decoded together: the new text keeps its spacing)
        text = self.tokenizer.decode(tail + hist[max(0, end - window):end])
        after = self.tail_chars[row] if tail else 0
        return any(text.find(s, max(0, after - len(s) + 1)) >= 0 for s in self.strings[row])

    def truncate_text(self, row: int, text: str) -> str:
        return cut_at_stop(text, self.strings[row])


def cut_at_stop(text: str, stop_strings) -> str:
    """`text` up to the first stop string in it (all of it where none is)."""
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text
