"""Lookup drafts from a corpus: what the model said after the same few tokens in its earlier answers.

Prompt lookup (`mtp.decoding.lookup`) copies from the row's own prompt and answer. When the row's last tokens
occurred there only as a single token, what followed is rarely right; but a model answering the same kind of
question again repeats its own phrasing ("Let's break this down step by step", "= <<48/2=24>>", "The answer
is"). A `LookupCorpus` holds, for every 4-, 3- and 2-token sequence seen at least twice in a set of the model's
answers, the continuation those occurrences agree on (SuffixDecoding's global tree, REST's datastore, in the
shape a fixed-size decoding step can read): `mtp train --targets self` builds one from the answers it trained
on and saves it in the model folder (`CORPUS_NAME`); decoding with `lookup` and a corpus (`--lookup-corpus auto`,
`generate(lookup_corpus=...)`) takes its drafts where the row's own match is shorter than 2 tokens
(`lookup_drafts`). The drafts are verified as before: output stays greedy's.

Measured (docs/benchmarks.md): offline on the default model's greedy answers to GSM8K test problems 0-49 (lookup
drafts alone, a corpus of its answers to 160 training questions) 1.80 tokens a forward from the row's own tokens,
2.08 with the corpus where the row's match is shorter than 2 tokens (2.01 where shorter than 3; 1.95 taking
whichever match is longer: the row's own 3-token match beats the corpus's 4-token one); decoding without heads
1.76 -> 2.09; with 4 trained heads, which already draft that phrasing, +1-2%: hence opt-in.

On the device the lookup is a few fixed-shape ops: the row's last tokens hashed (newest first, so every size is
one more step of the same hash), `searchsorted` into the sorted keys, the longest size found wins. A hash that
collides costs a draft the verifier refuses, never a wrong token.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from mtp.errors import MTPError

CORPUS_NAME = "lookup_corpus.safetensors"  # in a model folder: read by decoding with `lookup`
NGRAM_SIZES = (4, 3, 2)  # longest first: a longer match predicts more of what follows
MAX_DRAFTS = 8  # continuation tokens kept per key (a step reads up to its `lookup`)
MIN_COUNT = 2  # a sequence seen once is kept out (most are; the table would be several times larger)
MIN_SHARE = 0.3  # a continuation token is kept while at least this share of the occurrences agree on it
_BASE = (1 << 21) + 23  # token ids below 2**21 - 1; hash * base + id stays below 2**63
_MODULUS = (1 << 40) - 87
_FORMAT = "1"


def _hash_step(h, token):
    """One more (older) token into the hash of the tokens newest first; numpy or torch int64, elementwise."""
    return (h * _BASE + (token + 1)) % _MODULUS


def _key(h, n):
    return h * 8 + n  # (the size in the key: sizes never share one)


_SIZES: dict[torch.device, torch.Tensor] = {}


def _sizes(device: torch.device) -> torch.Tensor:
    """NGRAM_SIZES ascending, on `device`: made once (a replayed step reads the tensor it was captured with)."""
    found = _SIZES.get(device)
    if found is None:
        found = _SIZES[device] = torch.tensor(sorted(NGRAM_SIZES), device=device)
    return found


class LookupCorpus:
    """Sorted keys (U,) of the token sequences kept, their continuations (U, MAX_DRAFTS) and how many of those
    tokens each has (U,); kept on the CPU, with one copy per device a decoding step reads (`on`)."""

    def __init__(self, keys: torch.Tensor, drafts: torch.Tensor, counts: torch.Tensor, answers: int = 0,
                 fingerprint: str | None = None):
        if keys.ndim != 1 or drafts.shape != (keys.shape[0], MAX_DRAFTS) or counts.shape != keys.shape:
            raise MTPError(f"a lookup corpus needs keys (U,), drafts (U, {MAX_DRAFTS}) and counts (U,); got "
                           f"{tuple(keys.shape)}, {tuple(drafts.shape)}, {tuple(counts.shape)}")
        self.keys, self.drafts, self.counts = keys.long(), drafts.long(), counts.long()
        self.size = keys.shape[0]  # sequences kept: the first `size` keys (the rest, if any, pad a fixed capacity)
        self.answers = answers
        self._devices: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if fingerprint is None:
            h = hashlib.sha256(self.keys.numpy().tobytes())
            h.update(self.drafts.numpy().tobytes())
            fingerprint = h.hexdigest()[:16]
        self.fingerprint = fingerprint  # (decoding sessions are keyed by it, not by the object)

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"LookupCorpus({len(self)} sequences, from {self.answers} answers)"

    @functools.cached_property
    def largest_token(self) -> int:
        """The largest token id its drafts hold (-1: none): a corpus's tables never change once made."""
        return int(self.drafts[:len(self)].max()) if len(self) else -1

    @classmethod
    def build(cls, answers: Iterable[Sequence[int]], min_count: int = MIN_COUNT) -> LookupCorpus:
        """From token sequences (a model's answers): every 4-, 3- and 2-token sequence seen `min_count` times or
        more, with the continuation its occurrences agree on, token by token (the most frequent next token
        while at least `MIN_SHARE` of those that went this far agree)."""
        pieces, n_answers = [np.full(MAX_DRAFTS, -1, np.int64)], 0
        for seq in answers:  # one array: the answers back to back, each followed by MAX_DRAFTS of -1
            s = np.asarray(seq, dtype=np.int64)
            if s.size and (s.min() < 0 or s.max() >= _BASE - 1):
                raise MTPError(f"a lookup corpus takes token ids from 0 to {_BASE - 2}")
            pieces += [s, np.full(MAX_DRAFTS, -1, np.int64)]
            n_answers += 1
        flat = np.concatenate(pieces)
        real = flat >= 0
        starts = np.flatnonzero(real & ~np.r_[False, real[:-1]])  # where each answer begins
        first = np.zeros(flat.size, np.int64)
        first[starts] = starts
        run = np.where(real, np.arange(flat.size) - np.maximum.accumulate(first) + 1, 0)  # tokens ending at j
        keys, places = [], []
        for n in NGRAM_SIZES:  # a sequence of n tokens s[j - n:j] followed by at least one token, s[j]
            at = np.flatnonzero(real[n:] & (run[n - 1:-1] >= n)) + n
            h = np.zeros(at.size, np.int64)
            for back in range(1, n + 1):  # newest first
                h = _hash_step(h, flat[at - back])
            keys.append(_key(h, n))
            places.append(at)
        key, at = np.concatenate(keys), np.concatenate(places)
        _, inverse, seen = np.unique(key, return_inverse=True, return_counts=True)
        kept = seen[inverse] >= min_count  # (most sequences are seen once: their continuations are never built)
        key, at = key[kept], at[kept]
        cont = flat[np.minimum(at[:, None] + np.arange(MAX_DRAFTS), flat.size - 1)]  # (R, MAX_DRAFTS), -1 after
        order = np.lexsort([cont[:, i] for i in reversed(range(MAX_DRAFTS))] + [key])  # by key, then continuation
        key, cont = key[order], cont[order]
        out = _agreed(key, cont)
        counts = (out >= 0).cumprod(1).sum(1)
        useful = counts > 0  # (a sequence whose continuations disagree at once drafts nothing: a shorter one may)
        out_keys = key[np.r_[True, key[1:] != key[:-1]]] if key.size else key
        return cls(torch.from_numpy(out_keys[useful]), torch.from_numpy(np.maximum(out[useful], 0)),
                   torch.from_numpy(counts[useful]), n_answers)

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, drafts, counts) on `device`, copied once and kept (a step replayed as a CUDA graph reads the
        copies it was captured with)."""
        device = torch.device(device)
        found = self._devices.get(device)
        if found is None:
            found = self._devices[device] = (self.keys.to(device), self.drafts.to(device), self.counts.to(device))
        return found

    def match(self, suffix: torch.Tensor, length: torch.Tensor, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafts (B, max_tokens) and how many (B,) for rows whose last tokens are `suffix` (B, >= 4; column k:
        the token k before the last) and whose sequences are `length` (B,) long; 0 where no kept sequence ends
        their tokens. Fixed-shape ops on the rows' device, no host read."""
        keys, drafts, counts = self.on(suffix.device)
        b = suffix.shape[0]
        if keys.shape[0] == 0:
            return suffix.new_zeros(b, max_tokens), length.new_zeros(b)
        hashes, h = [], torch.zeros_like(suffix[:, 0])
        for n in range(1, max(NGRAM_SIZES) + 1):  # (4 steps of one hash: every size is a prefix, newest first)
            h = _hash_step(h, suffix[:, n - 1])
            hashes.append(h)
        sizes = _sizes(suffix.device)  # (S,) ascending
        query = _key(torch.stack(hashes, 1)[:, sizes - 1], sizes)  # (B, S): one search for every size
        at = torch.searchsorted(keys, query).clamp_max(keys.shape[0] - 1)  # (B, S)
        hit = (keys[at] == query) & (length[:, None] >= sizes)  # (B, S)
        best = (hit * torch.arange(1, sizes.shape[0] + 1, device=hit.device)).argmax(1, keepdim=True)  # the longest
        found_at = at.gather(1, best)[:, 0]  # (B,)
        count = torch.where(hit.any(1), counts[found_at].clamp_max(max_tokens), 0)
        return drafts[found_at, :max_tokens], count

    def save(self, path: str | Path) -> Path:
        """Write it as safetensors (written beside and renamed: a crash leaves the old file or none)."""
        n = len(self)
        return _write(path, self.keys[:n].numpy(), self.drafts[:n].numpy(), self.counts[:n].numpy(), self.answers)

    @classmethod
    def load(cls, path: str | Path) -> LookupCorpus:
        """Read a saved corpus; one written by another version (other sizes, another format) is an MTPError."""
        from mtp.models.safetensors_io import SafetensorsReader

        path = Path(path)
        with SafetensorsReader(path) as f:  # (a file that is not safetensors: an MTPError naming it)
            meta = f.metadata
            if meta.get("format") != _FORMAT or meta.get("ngram_sizes") != ",".join(map(str, NGRAM_SIZES)) or \
                    set(f.tensors) != {"keys", "drafts", "counts"}:
                raise MTPError(f"{path}: not a lookup corpus this mtp reads (format {meta.get('format')!r}); "
                               "build it again (`mtp train --targets self` writes one)")
            tensors = {name: f.read(name) for name in ("keys", "drafts", "counts")}
            answers = int(meta.get("answers", 0)) if str(meta.get("answers", "0")).isdigit() else 0
        return cls(tensors["keys"], tensors["drafts"], tensors["counts"], answers)


class GrowingCorpus(LookupCorpus):
    """A lookup corpus that takes in the answers decoded with it (SuffixDecoding's global tree, grown online):
    `generate` adds each row's answer when it ends, so a server's later requests draft from its earlier answers.

    It is rebuilt (`LookupCorpus.build`) from the most recent answers, up to `max_tokens` of them, merged with
    `base` (a model folder's corpus; where both keep a sequence, the answers' continuation wins), once enough new
    answers came (an eighth of those it holds, at least 2): at once while they are few, past `SYNC_TOKENS` on a
    thread of its own, installed when the next answer ends or the next `generate` call starts. Its tensors have a
    fixed capacity (unused keys are `PAD_KEY`, which no lookup equals) and are written in place, so a decoding
    step replayed as a CUDA graph reads the new contents; past `capacity` the sequences with the longest
    continuations are kept. What it holds changes drafts only: the answers stay those of decoding without it.
    A sampled call's draws follow its drafts, so a seed reproduces them only with the corpus as it was
    (`background=False` makes its contents follow the answers alone, not the builds' timing)."""

    SYNC_TOKENS = 1 << 14  # answers' tokens up to which a rebuild runs at once (~10-40 ms on a CPU core)

    def __init__(self, base: LookupCorpus | None = None, capacity: int = 1 << 17, max_tokens: int = 1 << 18,
                 background: bool = True, path: str | Path | None = None):
        """`path`: a file each rebuild is written to (safetensors, renamed into place; `finish` writes the last
        answers too), which `LookupCorpus.load` reads back as the next run's base: `--save-corpus`."""
        keys = torch.full((capacity,), PAD_KEY, dtype=torch.long)
        super().__init__(keys, torch.zeros(capacity, MAX_DRAFTS, dtype=torch.long),
                         torch.zeros(capacity, dtype=torch.long), fingerprint=f"growing-{uuid.uuid4().hex[:12]}")
        self.base, self.capacity, self.max_tokens, self.background = base, capacity, max_tokens, background
        self.recent: deque[list[int]] = deque()  # the answers a rebuild reads, oldest first
        self.recent_tokens = 0
        self.added = 0  # answers taken in since it was made
        self._new = 0  # answers since the last rebuild began
        self._paused = 0  # `paused` blocks open
        self._lock = threading.Lock()
        self._builder: threading.Thread | None = None
        self._built: tuple | None = None  # a finished rebuild: (its generation, its tables, its answers)
        self._generation = 0  # rebuilds begun (a rebuild's tables are installed only over an older one's)
        self._installed = 0  # the generation installed
        self.path = Path(path) if path is not None else None
        self._write_lock = threading.Lock()
        self._written = 0  # the generation last written to `path`
        self._write_failed = False  # (said once)
        self._install(*_merged(None, base, capacity))
        self.answers = base.answers if base is not None else 0

    @property
    def largest_token(self) -> int:
        """Its base's: the answers it takes in are the model's own tokens (read at every call: not scanned)."""
        return self.base.largest_token if self.base is not None else -1

    def __repr__(self) -> str:
        return f"GrowingCorpus({len(self)} sequences, {self.added} answers taken in, capacity {self.capacity})"

    @contextlib.contextmanager
    def paused(self):
        """Answers decoded meanwhile are not taken in (a server's warm-up)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def add(self, answer: Sequence[int]) -> None:
        """Take in an answer (token ids); rebuild when enough came. Installs a finished rebuild first."""
        with self._lock:
            self._install_built()
            tokens = [int(t) for t in answer]
            if not tokens or self._paused:
                return
            self.recent.append(tokens)
            self.recent_tokens += len(tokens)
            while self.recent_tokens > self.max_tokens and len(self.recent) > 1:
                self.recent_tokens -= len(self.recent.popleft())
            self.added += 1
            self._new += 1
            if self._builder is not None or self._new < max(2, len(self.recent) // 8):
                return
            if not self.background or self.recent_tokens <= self.SYNC_TOKENS:
                self._rebuild_now()
                return
            self._new, self._generation = 0, self._generation + 1
            self._builder = threading.Thread(target=self._build_in_background,
                                             args=(self._generation, list(self.recent)), name="mtp-corpus",
                                             daemon=True)
            self._builder.start()

    def refresh(self) -> None:
        """Install a rebuild that finished on its thread (`generate` calls it as it starts)."""
        with self._lock:
            self._install_built()

    def wait(self) -> None:
        """Wait for a rebuild on its thread, then install it."""
        builder = self._builder
        if builder is not None:
            builder.join()
        self.refresh()

    def rebuild(self) -> None:
        """Rebuild from the answers taken in so far, now (before `save`, say; a rebuild on its thread that ends
        later is older, and not installed)."""
        with self._lock:
            self._rebuild_now()

    def finish(self) -> None:
        """Wait for a rebuild on its thread; with a `path`, rebuild from the answers since and write it (a
        command's end: the file holds every answer taken in). A write that fails is an MTPError."""
        self.wait()
        if self.path is None:
            return
        with self._lock:
            if self._new or self._written < self._generation or not self._generation:
                self._rebuild_now(strict=True)

    def _rebuild_now(self, strict: bool = False) -> None:  # (under the lock)
        self._new, self._generation = 0, self._generation + 1
        self._built = self._rebuilt(self._generation, list(self.recent))
        self._write(self._built, strict)
        self._install_built()

    def _build_in_background(self, generation: int, answers: list[list[int]]) -> None:
        if sys.platform == "linux":  # (a thread's own nice value: elsewhere this would set the process's)
            # The cores are decoding's: beside 2 torch threads on 2 cores, a build at the same priority made
            # decoding 4x slower while it ran (45 -> 10 tokens/s), at the lowest 6% (48 -> 45)
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        built = None
        try:
            built = self._rebuilt(generation, answers)
            self._write(built)
        finally:  # (a failed rebuild leaves the corpus as it was; the next one may be started)
            with self._lock:
                if built is not None and (self._built is None or self._built[0] < generation):
                    self._built = built
                self._builder = None

    def _rebuilt(self, generation: int, answers: list[list[int]]) -> tuple:
        return generation, _merged(LookupCorpus.build(answers), self.base, self.capacity), len(answers)

    def _write(self, built: tuple, strict: bool = False) -> None:
        """A rebuild's tables to `path`, unless a newer one's are there. While decoding goes on a failed write is
        a warning (the next rebuild tries again; `strict`, the command's end: an MTPError)."""
        generation, tables, answers = built
        if self.path is None:
            return
        with self._write_lock:
            if generation <= self._written:
                return
            try:
                _write(self.path, *tables, (self.base.answers if self.base is not None else 0) + answers)
            except (MTPError, OSError) as e:
                if strict:
                    raise MTPError(f"--save-corpus: {e}") from e
                if not self._write_failed:
                    self._write_failed = True
                    print(f"mtp: warning: the lookup corpus was not written ({e}); decoding goes on",
                          file=sys.stderr, flush=True)
                return
            self._written = generation

    def _install_built(self) -> None:
        """Install a finished rebuild newer than the tables installed (called under the lock, on the decoding
        thread: `add`, or `refresh` as a call starts, between its steps)."""
        if self._built is not None:
            generation, tables, answers = self._built
            self._built = None
            if generation > self._installed:
                self._installed = generation
                self._install(*tables)
                self.answers = (self.base.answers if self.base is not None else 0) + answers

    def _install(self, keys: np.ndarray, drafts: np.ndarray, counts: np.ndarray) -> None:
        """Write the tables into the fixed-capacity tensors, and into each device's copy, in place."""
        n = min(keys.shape[0], self.capacity)
        self.keys[:n] = torch.from_numpy(keys[:n])
        self.keys[n:] = PAD_KEY
        self.drafts[:n] = torch.from_numpy(drafts[:n])
        self.drafts[n:] = 0
        self.counts[:n] = torch.from_numpy(counts[:n])
        self.counts[n:] = 0
        self.size = n
        for device, copies in self._devices.items():
            if device.type != "cpu":  # (on the CPU the copies are these tensors)
                for copy, source in zip(copies, (self.keys, self.drafts, self.counts), strict=True):
                    copy.copy_(source)


def finish_corpus(corpus: LookupCorpus | None) -> None:
    """A command's end (however it ends): a growing corpus with a file (`--save-corpus`) writes what it took in,
    and says so on stderr."""
    if isinstance(corpus, GrowingCorpus) and corpus.path is not None:
        corpus.finish()
        print(f"mtp: lookup corpus ({len(corpus)} sequences, {corpus.added} answers taken in) written to "
              f"{corpus.path}", file=sys.stderr, flush=True)


def _write(path: str | Path, keys: np.ndarray, drafts: np.ndarray, counts: np.ndarray, answers: int) -> Path:
    """A corpus's tables as safetensors (written beside and renamed: a crash leaves the old file or none)."""
    from safetensors.numpy import save_file

    from mtp.io import atomic_path

    with atomic_path(path) as tmp:
        save_file({"keys": np.ascontiguousarray(keys, np.int64), "drafts": np.ascontiguousarray(drafts, np.int32),
                   "counts": np.ascontiguousarray(counts, np.uint8)},
                  str(tmp), metadata={"format": _FORMAT, "answers": str(answers),
                                      "ngram_sizes": ",".join(map(str, NGRAM_SIZES))})
    return Path(path)


def check_corpus_tokens(corpus: LookupCorpus, vocab_size: int) -> None:
    """A corpus whose drafts hold token ids past the model's vocabulary (another model's answers) is an MTPError
    before decoding, not an index error in the embedding (on a GPU, a device-side assert)."""
    largest = corpus.largest_token
    if largest >= vocab_size:
        raise MTPError(f"the lookup corpus holds token id {largest}, past this model's vocabulary (ids 0 to "
                       f"{vocab_size - 1}): a corpus of another model's answers? Build one from this model's "
                       "(`mtp train --targets self` writes it)")


def fixed_corpus(corpus: LookupCorpus | None) -> LookupCorpus | None:
    """What a call whose drafts must not change with earlier answers reads: a growing corpus's base."""
    return corpus.base if isinstance(corpus, GrowingCorpus) else corpus


PAD_KEY = torch.iinfo(torch.long).max  # a growing corpus's unused keys: above every key, equal to none


def _tables(corpus: LookupCorpus | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if corpus is None:
        return np.zeros(0, np.int64), np.zeros((0, MAX_DRAFTS), np.int64), np.zeros(0, np.int64)
    n = len(corpus)
    return corpus.keys[:n].numpy(), corpus.drafts[:n].numpy(), corpus.counts[:n].numpy()


def _merged(built: LookupCorpus | None, base: LookupCorpus | None, capacity: int) -> tuple:
    """`built`'s tables with `base`'s sequences it does not hold, sorted by key; past `capacity`, the sequences
    with the longest continuations (the first on a tie)."""
    tables = [_tables(built), _tables(base)]
    keys, drafts, counts = (np.concatenate(parts) for parts in zip(*tables, strict=True))
    _, first = np.unique(keys, return_index=True)  # (sorted by key; `built`'s row where both hold one)
    if first.size > capacity:  # (`first` is in key order: positions kept in their order keep it)
        first = first[np.sort(np.argsort(-counts[first], kind="stable")[:capacity])]
    return keys[first], drafts[first], counts[first]


def _agreed(key: np.ndarray, cont: np.ndarray) -> np.ndarray:
    """For rows sorted by key, then continuation (R,), (R, MAX_DRAFTS) (-1 past an answer's end): each key's
    continuation (K, MAX_DRAFTS) that its rows agree on, token by token: the most frequent next token among the
    rows that agree so far (the first on a tie), while at least MIN_SHARE of the key's rows do; -1 after.

    Rows that agree on a key and its first i tokens are one run of the sorted rows, so each level is a few array
    ops over all keys at once: the runs of the next token inside each run, the largest of them per run."""
    if key.size == 0:
        return np.zeros((0, MAX_DRAFTS), np.int64)
    new = np.r_[True, key[1:] != key[:-1]]  # a run starts: the key's (level -1), later its next tokens'
    group_size = np.diff(np.r_[np.flatnonzero(new), key.size])  # (K,)
    run_of_row = np.cumsum(new) - 1  # each row's run at the level before
    active = np.arange(group_size.size)  # each key's run that agrees so far
    alive = np.ones(group_size.size, bool)
    out = np.full((group_size.size, MAX_DRAFTS), -1, np.int64)
    for i in range(MAX_DRAFTS):
        new = new | np.r_[True, cont[1:, i] != cont[:-1, i]]
        starts = np.flatnonzero(new)
        sizes = np.diff(np.r_[starts, key.size])
        parent = run_of_row[starts]  # (runs,) the run each splits from
        votes = np.where(cont[starts, i] >= 0, sizes, 0)  # (answers that ended here vote for nothing)
        order = np.lexsort((starts, -votes, parent))  # per parent: the most votes first, then the first
        lead = order[np.r_[True, parent[order][1:] != parent[order][:-1]]]
        best = np.empty(run_of_row[-1] + 1, np.int64)
        best[parent[lead]] = lead
        chosen = best[active]
        token = cont[starts[chosen], i]
        alive &= (token >= 0) & (votes[chosen] >= MIN_SHARE * group_size)
        out[alive, i] = token[alive]
        active, run_of_row = chosen, np.cumsum(new) - 1
    return out


def folder_corpus(folder: str | Path | None) -> LookupCorpus | None:
    """The corpus saved in a model folder, or None where it has none."""
    if folder is None:
        return None
    path = Path(folder) / CORPUS_NAME
    return LookupCorpus.load(path) if path.is_file() else None


def check_corpus_choice(choice: str) -> None:
    """A --lookup-corpus value names "none", "auto" or a corpus file that reads (checked before a model loads:
    it is read again after, a few MB at most)."""
    if choice not in ("auto", "none"):
        from mtp.io import input_file

        LookupCorpus.load(input_file(choice, "lookup corpus"))


def chosen_corpus(choice: str, model) -> LookupCorpus | None:
    """A --lookup-corpus value for `model`: "none", "auto" (its folder's, or None) or a corpus file."""
    if choice == "none":
        return None
    return model_corpus(model) if choice == "auto" else LookupCorpus.load(choice)


def model_corpus(model) -> LookupCorpus | None:
    """The corpus saved in the folder `model` was loaded from (`ModelSource.location`), or None."""
    location = getattr(getattr(model, "source", None), "location", None)
    return folder_corpus(location) if location and Path(location).is_dir() else None
