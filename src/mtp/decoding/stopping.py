"""Stop conditions applied to each step's emitted block: end tokens, stop strings, nothing past them."""

from __future__ import annotations

import torch


class StopChecker:
    def __init__(self, batch_size: int, stop_token_ids: list[int] | None, stop_strings: list[str] | None,
                 tokenizer=None, device: torch.device | str = "cpu"):
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids or [])), dtype=torch.long, device=device)
        self.stop_strings = [s for s in (stop_strings or []) if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer = tokenizer
        self.history: list[list[int]] = [[] for _ in range(batch_size)]  # only kept when stop strings are used

    def apply(self, rows: torch.Tensor, emitted: torch.Tensor, counts: torch.Tensor, produced: torch.Tensor):
        """Cut each row's emitted block after its first stop token. Returns (counts, finished (B,))."""
        width = emitted.shape[1]
        in_block = torch.arange(width, device=emitted.device)[None, :] < counts[:, None]  # (B, W)
        finished = torch.zeros_like(counts, dtype=torch.bool)
        if self.stop_ids.numel():
            hit = torch.isin(emitted, self.stop_ids) & in_block
            any_hit = hit.any(-1)
            first = hit.float().argmax(-1)
            counts = torch.where(any_hit, first + 1, counts)
            finished |= any_hit
        if self.stop_strings:
            counts, finished = self._apply_strings(rows, emitted, counts, finished)
        return counts, finished

    def _apply_strings(self, rows, emitted, counts, finished):
        counts_l, emitted_l = counts.tolist(), emitted.tolist()
        fin = finished.tolist()
        for i, row in enumerate(rows.tolist()):
            hist = self.history[row]
            base = len(hist)
            hist.extend(emitted_l[i][: counts_l[i]])
            # Only the tail can contain a new match: decode a window that covers the longest stop string.
            window = max(len(s) for s in self.stop_strings) + 8 + counts_l[i]
            if not any(s in self.tokenizer.decode(hist[-window:]) for s in self.stop_strings):
                continue
            for j in range(max(base, 0) + 1, len(hist) + 1):  # the shortest prefix that completes a stop string
                text = self.tokenizer.decode(hist[max(0, j - window):j])
                if any(s in text for s in self.stop_strings):
                    del hist[j:]
                    counts_l[i] = j - base
                    fin[i] = True
                    break
        return (torch.tensor(counts_l, device=counts.device),
                torch.tensor(fin, device=counts.device, dtype=torch.bool))

    def truncate_text(self, text: str) -> str:
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        return text[:cut] if cut >= 0 else text
