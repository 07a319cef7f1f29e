"""The decoding side of `mtp serve`: one thread that takes the requests' prompts (`Job`s) in batches and decodes
them with `mtp.generate`, handing each job's text pieces and answer back to its HTTP thread through a queue.

Jobs that wait together are decoded as one left-padded batch, up to `max_batch_size` rows, each row with its own
request's max_tokens, sampling settings, penalties, stop strings and log-probabilities (`mtp.decoding.row_options`;
the batch scores as many alternatives as its rows ask for at most, each row gets its own; a seeded request's jobs
only with each other); a batch starts once no job
came for `batch_window` seconds (a burst is decoded together). A request's `n` choices of a prompt are jobs of
their own, rows of the batch. Continuous batching: a job that comes while a batch decodes joins it between two
steps (`mtp.decoding.generate.Admission`) where a row is free and it could have been one of the batch's rows, and
its prompt fits the batch's cache and it asks for nothing the batch's steps do not compute (a sampled job joins a
batch that samples, a penalized one a batch with penalties, one asking for log-probabilities a batch that scores
as many alternatives) - in the order jobs came: the first that cannot join waits for the next batch,
and so do those after it. Seeded requests, echoed prompts, ConfAdapt, static k and dynamic trees decode in
static batches (a job that comes while they decode waits for the next batch). A job whose client left is dropped;
in a batch, its row ends at its next step (the others go on), and a batch whose clients all left stops there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from queue import Queue

from mtp.decoding import openai_api as api
from mtp.decoding.commands import StreamedText, answer_text
from mtp.decoding.corpus import GrowingCorpus, fixed_corpus
from mtp.decoding.generate import (
    Admission,
    GenerationResult,
    GenerationStats,
    default_stop_token_ids,
    left_pad,
)
from mtp.decoding.generate import generate as generate_tokens
from mtp.decoding.logprobs import TokenLogprob, prompts_logprobs
from mtp.decoding.penalties import Penalties
from mtp.decoding.prefixes import PromptCache
from mtp.decoding.row_options import RowOptions, row_arguments
from mtp.decoding.stopping import cut_at_stop
from mtp.errors import MTPError, NonFiniteLogitsError, first_line
from mtp.runtime import CoreWait


@dataclass
class Job:
    """One prompt of a request, for the decoding thread. Its events go to the request's queue, tagged with
    `index` (its choice): a streamed echo's ("echo", index, the prompt's TokenLogprobs or None) first, then
    ("text", index, (piece, its tokens' TokenLogprobs or None)) while it decodes, then ("end", index, Finished)
    or ("error", index, (status, message))."""

    ids: list[int]
    sampling: api.Sampling
    index: int
    events: Queue
    streamed: StreamedText | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)  # its client left
    echo: bool = False  # the prompt's tokens are scored too (with sampling.logprobs)
    first_choice: bool = True  # the first of its prompt's n choices (what counts the prompt's tokens)

    def batches_with(self, other: Job) -> bool:
        """Whether the two may be decoded in one batch (each row with its own settings): a seeded request's prompts
        and choices with each other only (its seed reproduces its draws only in a batch of its own); prompts only
        scored (max_tokens 0, which may fill the context, the drafts' room included) with their like."""
        ours, theirs = self.sampling, other.sampling
        scored = (ours.max_tokens == 0) == (theirs.max_tokens == 0)
        return (ours.seed is None and theirs.seed is None or self.events is other.events) and scored

    def scored(self, scores: list[TokenLogprob | None] | None) -> list[TokenLogprob | None] | None:
        """Its tokens' log-probabilities from its batch's (which may hold more alternatives): None where it asked
        for none."""
        top = self.sampling.logprobs
        if top is None or scores is None:
            return None
        return [s if s is None or len(s.top) <= top else dataclasses.replace(s, top=s.top[:top]) for s in scores]

    @functools.cached_property
    def options(self) -> RowOptions:
        """Its row's settings (what `generate` takes per row)."""
        s = self.sampling
        return RowOptions(s.do_sample, s.temperature, s.top_k, s.top_p, s.min_p,
                          Penalties(s.repetition_penalty, s.presence_penalty, s.frequency_penalty, s.logit_bias,
                                    s.min_tokens), s.stop)


def most_logprobs(jobs: list[Job]) -> int | None:
    """The most alternatives the jobs' log-probabilities ask for (None: none asks for any)."""
    return max((j.sampling.logprobs for j in jobs if j.sampling.logprobs is not None), default=None)


def _within(asked: int | None, top: int | None) -> bool:
    """Whether a batch that scores `top` alternatives (None: nothing) holds what a job asking for `asked` needs."""
    return asked is None or top is not None and asked <= top


class Cancelled(Exception):
    """Every client of a batch left: its decoding stops (raised from the streamer, out of `generate`)."""


@dataclass
class Finished:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (an end token or stop string) or "length" (max_tokens)
    batch: dict  # the figures of its batch when its row ended (`GenerationStats.to_dict` and the rows so far)
    logprobs: list[TokenLogprob] | None = None  # one per token, where the request asked for them
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo with logprobs: one per prompt token


@dataclass
class Counts:
    """What the server decoded since it started (its /metrics)."""

    answered: int = 0  # prompts (a request may hold several)
    cancelled: int = 0  # prompts whose clients left before their answers were done
    failed: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    row_forwards: int = 0  # forwards each row took part in, summed (tokens per forward: generated / this)
    decode_seconds: float = 0.0

    def answer(self, job: Job, tokens: list[int]) -> None:
        """A job's answer was sent (one whose client had left counts as cancelled)."""
        if job.cancelled.is_set():
            self.cancelled += 1
            return
        self.answered += 1
        self.prompt_tokens += len(job.ids) if job.first_choice else 0
        self.generated_tokens += len(tokens)

    def batch(self, stats) -> None:
        self.batches += 1
        self.row_forwards += stats.row_forwards
        self.decode_seconds += stats.seconds

    def prometheus(self, waiting: int, reused: int = 0, corpus=None) -> str:
        """The counts in Prometheus' text format (`reused`: prompt tokens the prompt cache held; `corpus`: the
        lookup corpus, whose size is shown where it grows from the answers)."""
        rows = [("answered", "counter", "prompts answered", self.answered),
                ("cancelled", "counter", "prompts whose clients left before the answer was done", self.cancelled),
                ("failed", "counter", "prompts that failed to decode", self.failed),
                ("batches", "counter", "batches decoded", self.batches),
                ("prompt_tokens", "counter", "prompt tokens of the prompts answered", self.prompt_tokens),
                ("prompt_cache_tokens", "counter", "prompt tokens loaded from earlier prompts' keys and values, not "
                 "fed", reused),
                ("generated_tokens", "counter", "tokens generated", self.generated_tokens),
                ("row_forwards", "counter", "forwards each row took part in, summed", self.row_forwards),
                ("decode_seconds", "counter", "seconds spent decoding", round(self.decode_seconds, 6)),
                ("tokens_per_forward", "gauge", "generated tokens per row forward since the start",
                 round(self.generated_tokens / self.row_forwards, 4) if self.row_forwards else 0),
                ("waiting", "gauge", "prompts waiting for a batch", waiting)]
        if isinstance(corpus, GrowingCorpus):
            rows += [("lookup_corpus_sequences", "gauge", "token sequences the lookup corpus of the answers holds",
                      len(corpus)),
                     ("lookup_corpus_answers", "counter", "answers taken into the lookup corpus", corpus.added)]
        lines = []
        for name, kind, what, value in rows:
            suffix = "_total" if kind == "counter" else ""
            lines += [f"# HELP mtp_{name}{suffix} {what}", f"# TYPE mtp_{name}{suffix} {kind}",
                      f"mtp_{name}{suffix} {value}"]
        return "\n".join(lines) + "\n"


SEED_STRIDE = 0x9E3779B97F4A7C15  # a seeded request's later batches: seed + this x their first choice's index


def _log(line: str) -> None:
    sys.stderr.write(line + "\n")  # one write: the HTTP threads' access log lines do not split it
    sys.stderr.flush()


@dataclass
class Batcher:
    """The decoding thread: takes waiting jobs in batches and decodes them with `decode` (generate's options
    other than the per-request ones: the strategy, its drafts, graphs)."""

    model: object
    decode: dict
    max_batch_size: int = 8
    batch_window: float = 0.01  # seconds a batch waits for a next request (a burst is decoded together)
    log: Callable[[str], None] = _log  # a line per batch
    waiting: list[Job] = field(default_factory=list)
    ready: threading.Condition = field(default_factory=threading.Condition)
    batch_sizes: list[int] = field(default_factory=list)  # the size of every batch decoded (the tests read it)
    counts: Counts = field(default_factory=lambda: Counts())
    decoding: list[Job] = field(default_factory=list)  # the batch being decoded (the jobs that joined it too)
    stopping: bool = False
    thread: threading.Thread | None = None
    join: bool = True  # jobs join a batch that decodes (False: static batching)
    join_room: int = 512  # cache slots a batch keeps past its first jobs' needs, for the jobs that join it
    prompt_cache: PromptCache | None = None  # recent prompts' keys and values, which later prompts start from
    wait_noted: bool = False  # whether the log said that other processes slowed a batch (`CoreWait`: once)

    def _generate(self, jobs: list[Job], sent: list[bool], before_first: Callable[[int], None],
                  finish: Callable[[int, list[int], list | None, GenerationStats], None]) -> GenerationResult:
        """The jobs' answers, decoded as one batch; each job's pieces go to its queue as they come (`sent[row]`:
        some did), `before_first(row)` called first, and `finish(row, tokens, their TokenLogprobs or None, the
        batch's statistics so far)` once the row ended. Jobs that ask for no new tokens (prompts to score) are not
        decoded (nor finished here)."""
        s, top = jobs[0].sampling, most_logprobs(jobs)
        if not any(j.sampling.max_tokens for j in jobs):
            empty = [[] for _ in jobs]
            return GenerationResult(empty, GenerationStats(), [""] * len(jobs), None if top is None else empty)

        def halt(row: int) -> bool:  # (asked after each step a row emits in)
            if all(j.cancelled.is_set() for j in jobs):  # every client left: the batch stops
                raise Cancelled
            return jobs[row].cancelled.is_set()  # this row's: it ends, the others go on

        def stream(row: int, new: list[int], logprobs: list[TokenLogprob] | None = None) -> None:
            job = jobs[row]
            before_first(row)
            logprobs = job.scored(logprobs)
            if job.streamed is not None and ((piece := job.streamed.add(new)) or logprobs):
                sent[row] = True
                job.events.put(("text", job.index, (piece, logprobs)))

        ids, mask = left_pad([j.ids for j in jobs], self.model.tokenizer.pad_token_id or 0)
        # A seeded request decodes in batches of its own, ungated (on a GPU the gate times one row's steps too): its
        # seed reproduces its draws. Its choices past the first batch (n or prompts beyond --max-batch-size) draw
        # from a seed of their own, made from the request's and their first choice's index: not the first
        # batch's draws again.
        # So is the lookup corpus it reads: a growing one's base, not what answers added to it
        options = self.decode | ({"adaptive_draft": False, "lookup_corpus": fixed_corpus(
            self.decode.get("lookup_corpus"))} if s.seed is not None else {})
        seed = s.seed if s.seed is None or not jobs[0].index else (s.seed + SEED_STRIDE * jobs[0].index) % 2**64
        admit = None
        if self.join and s.seed is None and not any(j.echo for j in jobs):
            admit = Admission(functools.partial(self._joining, jobs, sent), self.max_batch_size, self.join_room)
        return generate_tokens(self.model, ids.to(self.model.device), mask.to(self.model.device),
                               max_new_tokens=[j.sampling.max_tokens for j in jobs],
                               **row_arguments([j.options for j in jobs]),  # (each row's own settings)
                               seed=seed, streamer=stream, logprobs=top, halt=halt, admit=admit, on_end=finish,
                               prompt_cache=self.prompt_cache, **options)

    def _joining(self, jobs: list[Job], sent: list[bool], active: int,
                 fits: Callable[..., bool]) -> list[tuple[list[int], int, RowOptions]]:
        """`Admission.take` for a batch that decodes `jobs`: the waiting jobs that join it now, in the order they
        came, up to the first that cannot (it may not share the batch, it echoes its prompt, it does not fit or
        asks for what the batch's steps do not compute, log-probabilities included, or no row is free): that one
        waits for the next batch, and those after it too. The joined jobs are added to `jobs`
        (their rows' indices follow in `generate`)."""
        taken: list[Job] = []
        top = most_logprobs(jobs)  # (the batch's, fixed from its first jobs: the step's host copy is that wide)
        with self.ready:
            for job in self.waiting:
                if job.cancelled.is_set():  # (counted by the decoding thread's loop)
                    continue
                if (self.stopping or active + len(taken) >= self.max_batch_size or job.echo
                        or not jobs[0].batches_with(job) or not _within(job.sampling.logprobs, top)
                        or not fits(len(job.ids), job.sampling.max_tokens, job.options)):
                    break
                taken.append(job)
            if taken:
                self.waiting = [j for j in self.waiting if all(j is not t for t in taken)]
        jobs.extend(taken)
        sent.extend(False for _ in taken)
        return [(j.ids, j.sampling.max_tokens, j.options) for j in taken]

    def _prompt_scores(self, jobs: list[Job]) -> tuple[list, dict]:
        """Echo with logprobs: each job's prompt scores (the batch's prompts scored together, once each for its n
        choices too) and the figures of the scoring."""
        start = time.perf_counter()
        scored = [j for j in jobs if j.echo and j.sampling.logprobs is not None]
        prompts = list(dict.fromkeys(tuple(j.ids) for j in scored))  # (a prompt's choices share its scores)
        top = max((j.sampling.logprobs for j in scored), default=0)  # (each job keeps the first k it asked for)
        scores_of = dict(zip(prompts, prompts_logprobs(self.model, [list(p) for p in prompts], top), strict=True))
        return ([j.scored(scores_of.get(tuple(j.ids))) if j.echo else None for j in jobs],
                {"scored_tokens": sum(map(len, scores_of)), "scoring_seconds": round(time.perf_counter() - start, 4)})

    def _stopped(self, tokens: list[int], text: str, stop: tuple[str, ...]) -> bool:
        """Whether a row of max_tokens tokens ended at its last token anyway: an end token or a stop string in
        its `text` (as the answer is sent: decoded after the prompt, so " Paris" matches a first "▁Paris" that
        decoded alone reads "Paris"). A row that ends sooner always stopped: a prompt and max_tokens always fit
        the context."""
        if not tokens:  # (max_tokens 0: a prompt scored)
            return False
        if tokens[-1] in self.end_ids:
            return True
        return any(x in text for x in stop)

    @functools.cached_property
    def end_ids(self) -> frozenset[int]:
        """The model's end tokens (what `generate` stops at), found once."""
        return frozenset(default_stop_token_ids(self.model, self.model.tokenizer))

    def warm_up(self) -> None:
        """Decode a few tokens before the first request (the first steps of a shape build its buffers or
        graphs)."""
        tok = self.model.tokenizer
        ids = tok("Hello", add_special_tokens=False).input_ids or [tok.pad_token_id or 0]
        events: Queue = Queue()
        corpus = self.decode.get("lookup_corpus")
        with corpus.paused() if isinstance(corpus, GrowingCorpus) else contextlib.nullcontext():  # (not an answer)
            self.decode_batch([Job(ids, api.Sampling(max_tokens=4), 0, events)], record=False)
        kind, _, value = events.get()
        if kind == "error":
            raise MTPError(f"the model failed its first decoding: {value[1]}")

    def submit(self, jobs: list[Job]) -> None:
        with self.ready:
            self.waiting = self._in_turns([*self.waiting, *jobs])
            self.ready.notify()

    def _in_turns(self, jobs: list[Job]) -> list[Job]:
        """`jobs` in turns between requests: each request's first `max_batch_size` jobs, in the order the requests
        came, then each one's next ones, and so on (a request's own jobs keep their order; one of a batch or less
        is where it came). In the order jobs came, a request of thousands of prompts held back every request sent
        after it until all of them were decoded: 106 s for a 2-token request behind one of 5,000 prompts (8 rows,
        2 CPU cores)."""
        seen: dict[int, int] = {}
        turns = []
        for job in jobs:  # (a request's jobs share its events queue)
            n = seen.get(id(job.events), 0)
            seen[id(job.events)] = n + 1
            turns.append(n // self.max_batch_size)
        return [job for _, job in sorted(zip(turns, jobs, strict=True), key=lambda pair: pair[0])]  # (stable)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="mtp-decode", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        """Whether the decoding thread is running (or not started yet: it will take the jobs then)."""
        return self.thread is None or (self.thread.is_alive() and not self.stopping)

    def stop(self) -> None:
        """End the decoding thread: the batch it decodes stops at its next step, as if its clients had left (a
        thread still in torch when the interpreter exits can abort the process)."""
        with self.ready:
            self.stopping = True
            for job in [*self.waiting, *self.decoding]:
                job.cancelled.set()
            self.ready.notify()
        if self.thread is not None:
            self.thread.join(60)

    def _run(self) -> None:
        while True:
            with self.ready:
                self.ready.wait_for(lambda: self.waiting or self.stopping)
                self._gather()
                left = [j for j in self.waiting if j.cancelled.is_set()]  # their clients left
                self.counts.cancelled += len(left)
                self.waiting = [j for j in self.waiting if not j.cancelled.is_set()]
                if self.stopping:
                    return
                if not self.waiting:
                    continue
                self.decoding = self._next_batch()
                self.waiting = [j for j in self.waiting if all(j is not b for b in self.decoding)]
            self.decode_batch(self.decoding)
            self.decoding = []

    def _gather(self) -> None:
        """Wait while requests keep coming (each within `batch_window` of the one before, for at most ten
        windows) and the batch is not full: a burst sent together is decoded together."""
        deadline = time.monotonic() + 10 * self.batch_window
        while self.waiting and len(self._next_batch()) < self.max_batch_size and time.monotonic() < deadline:
            count = len(self.waiting)
            if not self.ready.wait_for(lambda count=count: len(self.waiting) > count, self.batch_window):
                return

    def _next_batch(self) -> list[Job]:
        """The first waiting job and the jobs that may share its batch, in the order they came."""
        first = self.waiting[0]
        return [j for j in self.waiting if j is first or first.batches_with(j)][:self.max_batch_size]

    def decode_batch(self, jobs: list[Job], record: bool = True) -> None:
        """Decode `jobs` (and the jobs that join them) as one batch: each job's answer ("end") goes to its queue
        as soon as its row ended, while the others decode on; a batch `generate` refuses whole is decoded a job at
        a time, so that only the job it cannot take fails."""
        sent = [False] * len(jobs)  # (a joining job's entries are added as it joins)
        answered: set[int] = set()
        try:
            prompt_scores, scoring = self._prompt_scores(jobs)

            def echo(row: int) -> None:  # a streamed echo: the prompt before the answer's first piece
                job = jobs[row]
                if job.echo and job.streamed is not None and not sent[row]:
                    sent[row] = True
                    job.events.put(("echo", job.index, prompt_scores[row]))

            def finish(row: int, tokens: list[int], scores: list | None, stats: GenerationStats) -> None:
                job, limit = jobs[row], jobs[row].sampling.max_tokens
                echo(row)
                sent[row] = True
                answered.add(row)
                stop = job.sampling.stop
                whole = answer_text(self.model.tokenizer, tokens, job.ids)
                text = cut_at_stop(whole, stop)
                reason = "length" if len(tokens) == limit and not self._stopped(tokens, whole, stop) else "stop"
                figures = {"rows": len(jobs), **stats.to_dict(), **(scoring if scoring["scored_tokens"] else {})}
                prompt = prompt_scores[row] if row < len(prompt_scores) else None  # (a joined job echoes nothing)
                job.events.put(("end", job.index, Finished(text, tokens, reason, figures, job.scored(scores), prompt)))
                if record:
                    self.counts.answer(job, tokens)

            first, wait = len(jobs), CoreWait()
            res = self._generate(jobs, sent, echo, finish)
            for row in range(len(jobs)):  # (prompts only scored: not decoded)
                if row not in answered:
                    finish(row, res.tokens[row], res.logprobs[row] if res.logprobs else None, res.stats)
        except Cancelled:
            if record:
                self.counts.cancelled += len(jobs) - len(answered)
                self.log(f"mtp serve: a batch of {len(jobs)} stopped: its clients left")
            return
        except MTPError as e:  # a request the batch cannot take: each on its own, so only that one fails
            if len(jobs) > 1 and not any(sent):
                for job in jobs:
                    if not job.cancelled.is_set():  # (a request fails whole: its other prompts are cancelled)
                        self.decode_batch([job], record)
                return
            # (the model's own failure on a request's text is the server's error: a client should not retry it
            # as malformed)
            status = HTTPStatus.INTERNAL_SERVER_ERROR if isinstance(e, NonFiniteLogitsError) else HTTPStatus.BAD_REQUEST
            self._failed(jobs, answered, status, first_line(e), record)
            return
        except Exception as e:  # noqa: BLE001 (the server goes on; the client is told, the log has the trace)
            traceback.print_exc()
            self._failed(jobs, answered, HTTPStatus.INTERNAL_SERVER_ERROR, f"decoding failed: {e}", record)
            return
        if not record:
            return
        self.batch_sizes.append(len(jobs))
        st = res.stats
        self.counts.batch(st)
        joined = f" ({len(jobs) - first} joined)" if len(jobs) > first else ""
        self.log(f"mtp serve: a batch of {len(jobs)}{joined}, {st.new_tokens} tokens in "
                 f"{st.seconds:.2f} s: {st.tokens_per_second:.1f} tokens/s, {st.tokens_per_forward:.2f} tokens "
                 "per forward")
        if not self.wait_noted and (note := wait.note()) is not None:  # (once a server: other processes' load)
            self.log(note)
            self.wait_noted = True

    def _failed(self, jobs: list[Job], answered: set[int], status: HTTPStatus, message: str, record: bool) -> None:
        """The batch failed: each job not yet answered gets the error."""
        left = [job for row, job in enumerate(jobs) if row not in answered]
        self.counts.failed += len(left) * record
        for job in left:
            job.events.put(("error", job.index, (status, message)))
