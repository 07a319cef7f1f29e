"""Progress of long work on stderr: a tqdm bar, or under --no-progress (a batch job's log) a plain line every few
minutes, so a log of an hour-long run still says how far it got, with no carriage returns in it."""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 300.0  # --no-progress: a line at most this often (none for work that ends sooner)


def progress_bar(enabled: bool, total: int | None, desc: str, unit: str, initial: int = 0, **tqdm_kwargs):
    """A tqdm bar when `enabled`, else `LogLines` with the same calls (update, set_postfix_str, refresh, close)."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, **tqdm_kwargs)
    return LogLines(total, desc, unit, initial)


class LogLines:
    """What a bar shows, as one line on stderr at most every `LOG_EVERY_S` seconds: done of total, elapsed minutes,
    minutes left at the rate so far, and the bar's postfix."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, clock=time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.initial = initial
        self.clock = clock
        self.started = self.printed = clock()
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.printed >= LOG_EVERY_S:
            self.printed = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.started
        text = f"mtp {self.desc}: {self.n:,}"
        units = self.unit + ("es" if self.unit.endswith(("s", "sh", "ch", "x")) else "s")  # batches, steps
        if self.total:
            text += f" of {self.total:,} {units} ({100 * self.n / self.total:.0f}%)"
        else:
            text += f" {units}"
        text += f", {elapsed / 60:.1f} min"
        done = self.n - self.initial
        if self.total and done > 0:
            text += f", ~{(self.total - self.n) * elapsed / done / 60:.1f} min left"
        return text + (f"; {self.postfix}" if self.postfix else "")

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass
