"""Decoding steps captured as CUDA graphs and replayed (gpt-fast, vLLM, SGLang do the same).

A small model's decoding step is hundreds of small kernels; launched one by one from Python they cost far more
than the arithmetic (21 ms a step on an H200 for a 135M model whose weights stream in 0.1 ms). A step of
`mtp.decoding.step` reads only tensors of fixed shapes and never the device from the host, so it is captured once
per (batch size, block configuration) and replayed: one launch per step. The state it reads is updated in place
at the end of the captured step, so the next replay reads the next step's inputs. The first step of each
configuration runs eagerly (it warms up the kernels and caches the capture needs), then the same step is captured.
The prompt's step too is captured, per prompt width (`generate` pads prompts to a few widths): eagerly it costs as
much as ~10 replayed steps, a tenth of a call's time when speculative decoding emits 128 tokens in ~50 steps.
`compiled` (`generate(graphs="compile")`; sampling excepted) runs the step through `torch.compile` before it is
captured, as gpt-fast does: inductor fuses each layer's norms, rotary, cache write and activation, and the step's
bookkeeping (verification, the cache's moves, end tokens, the next state) into a few kernels, while the matmuls
stay cuBLAS calls. It compiles once per step shape (then with symbolic sizes: a few compiles a run, tens of
seconds each).
A `DecodeSession` keeps a batch size's cache, state buffers and graphs between `generate` calls.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable

import torch

from mtp.decoding.step import Decoder, DecodeState, StepResult
from mtp.models.weight_state import outlived, storage_refs, weights_state

COMPILE_NOTICE_S = 5.0  # a compiling step that takes longer prints a line on stderr saying what it waits for


class GraphedSteps:
    """Run `decoder.step` on `state` in place, replaying one captured graph per (batch size, `Block`). Off CUDA the
    "graph" is the same in-place step run again (the tests' stand-in for a capture: same buffers, same order)."""

    def __init__(self, decoder: Decoder, compiled: bool = False):
        self.decoder = decoder
        self.compiled = compiled  # the captured steps run what torch.compile made of the step
        self.step_in_place = _compiled(self._step_in_place) if compiled else self._step_in_place
        self.graphs: dict[tuple, Callable[[], StepResult]] = {}  # (B, n, m, drafting, catch_up) -> replay
        self.prompts: dict[tuple[int, int], tuple] = {}  # prompt shape -> (its input buffers, replay)
        self.device = decoder.cache.valid.device
        self.cuda = self.device.type == "cuda"
        with _on(self.device):  # (the pool, streams and graphs are the current device's: the cache's, here)
            self.pool = torch.cuda.graph_pool_handle() if self.cuda else None  # one pool: graphs never run together

    def __call__(self, state: DecodeState, n: int, m: int, drafting: bool = True, catch_up: int = 0) -> StepResult:
        key = (state.pending.shape[0], n, m, drafting, catch_up)
        replay = self.graphs.get(key)
        if replay is not None:
            return replay()
        # A compiled step compiles in the warm-up, so the capture records its kernels only.
        result, self.graphs[key] = self._capture(lambda: self._warm_up(state, *key[1:]),
                                                 lambda: self.step_in_place(state, *key[1:]))
        return result

    def _warm_up(self, state: DecodeState, *block) -> StepResult:
        """The first step of a configuration; compiled, where it fails to compile it runs (and is captured, and
        every later one) uncompiled, with a warning: a compile fails before any of the step has run (one graph,
        `fullgraph`), so the step is simply run again. A compile that takes a while says so on stderr."""
        notice = None
        if self.compiled:  # a step shape new to torch.compile takes tens of seconds: say why nothing moves
            rows, (n, m) = state.pending.shape[0], block[:2]
            line = (f"mtp: compiling the decoding step for {rows} row{'s' if rows > 1 else ''}, {n} drafts and {m} "
                    "lookup drafts (--graphs compile: tens of seconds, once per step shape)")
            notice = threading.Timer(COMPILE_NOTICE_S, print, (line,), {"file": sys.stderr, "flush": True})
            notice.daemon = True
            notice.start()
        try:
            return self.step_in_place(state, *block)
        except _compile_errors() as e:
            if not self.compiled:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            warnings.warn(f"mtp: compiling the decoding step failed ({type(e).__name__}: {first}); the CUDA graphs "
                          "replay the uncompiled step (--graphs on)", RuntimeWarning, stacklevel=2)
            self.compiled, self.step_in_place = False, self._step_in_place
            return self.step_in_place(state, *block)
        finally:
            if notice is not None:
                notice.cancel()

    def prefill(self, prompt: DecodeState, state: DecodeState | None) -> tuple[DecodeState, StepResult]:
        """The prompt's step into the session's state buffers (`state`; None: the first prompt's new state becomes
        them), replayed from a graph captured at the first prompt of this width (its inputs copied into the
        captured prompt's buffers); that first one runs eagerly. It is not compiled even where the later steps
        are: every prompt width would compile anew."""
        key = tuple(prompt.pending.shape)
        entry = self.prompts.get(key)
        if entry is not None and state is not None:
            inputs, replay = entry
            inputs.copy_(prompt)
            return state, replay()
        inputs = prompt.clone()  # the prompt's tensors may be the caller's: later prompts are copied into these
        buffers = [state]

        def first() -> StepResult:  # this call's prompt, into the session's buffers (or as them)
            new, result = self.decoder.step(prompt, 0, 0)
            buffers[0] = _adopted(buffers[0], new)
            return result

        result, replay = self._capture(first, lambda: self._step_in_place(inputs, 0, 0, into=buffers[0]))
        self.prompts[key] = (inputs, replay)
        return buffers[0], result

    def _capture(self, warm_up: Callable[[], StepResult],
                 run: Callable[[], StepResult]) -> tuple[StepResult, Callable[[], StepResult]]:
        """`warm_up()` eagerly, then `run` captured as a CUDA graph (the same work on the buffers the graph will
        read): (the eager result, a replay that returns the captured result). On CUDA the warm-up runs on a side
        stream, as a capture wants. Off CUDA the replay runs `run` again and, as a graph does, writes its result
        into the same tensors every time: the tests' stand-in for a capture."""
        if not self.cuda:
            fixed: list[StepResult] = []

            def again() -> StepResult:
                new = run()
                if not fixed:
                    fixed.append(new)
                for held, value in zip(_tensors(fixed[0]), _tensors(new), strict=True):
                    if held is not value:
                        held.copy_(value)
                return fixed[0]

            return warm_up(), again
        with _on(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = warm_up()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.decoder.generator is not None:
                graph.register_generator_state(self.decoder.generator)
            with torch.cuda.graph(graph, pool=self.pool):
                captured = run()
        if self.device.index == torch.cuda.current_device():
            return result, lambda: graph.replay() or captured

        def replay() -> StepResult:  # a model on another GPU than the current one (`cuda:1`)
            with torch.cuda.device(self.device):
                graph.replay()
            return captured

        return result, replay

    def _step_in_place(self, state: DecodeState, n: int, m: int, drafting: bool = True, catch_up: int = 0,
                       into: DecodeState | None = None) -> StepResult:
        """The step from `state`, its new state written into `into`'s buffers (default: `state`'s own)."""
        new, result = self.decoder.step(state, n, m, drafting, catch_up)
        (state if into is None else into).copy_(new)
        return result


def _on(device: torch.device):
    """The CUDA device `device` made current for the block (streams, graphs and pools are the current device's),
    or nothing off CUDA."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compiled(step: Callable[..., StepResult], backend: str = "inductor") -> Callable[..., StepResult]:
    """`step` through torch.compile, as one graph (`fullgraph`: every step shape traces as one,
    `tests/decoding/test_graphs.py`; one that did not would fail to compile before running, and be replayed
    uncompiled: `GraphedSteps._warm_up`). The first size of a dimension (a block width, a batch size, a cache's
    length) compiles for itself, the next with that size symbolic (torch's automatic dynamic shapes), so a bench's
    dozen step shapes cost a few compiles, not a dozen."""
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    # The tree's shape-only tensors are built by functools caches, which dynamo traces through (a warning each):
    # inside a compiled step they are constants inductor folds.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
    return torch.compile(step, dynamic=None, fullgraph=True, backend=backend)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What torch.compile raises when it cannot trace or compile (dynamo's errors, inductor's, Triton's wrapped;
    an older torch has no InductorError: its inductor errors arrive as dynamo's BackendCompilerFailed)."""
    import torch._dynamo.exc
    import torch._inductor.exc

    inductor = getattr(torch._inductor.exc, "InductorError", None)
    return (torch._dynamo.exc.TorchDynamoException,) + ((inductor,) if inductor is not None else ())


def _tensors(result: StepResult) -> list[torch.Tensor]:
    return [t for t in (result.host, result.trunk, result.kept) if t is not None]


def _adopted(state: DecodeState | None, new: DecodeState) -> DecodeState:
    """`new` written into `state`'s buffers, or, the first time, `new`'s tensors as the buffers."""
    if state is None:
        return new
    state.copy_(new)
    return state


class DecodeSession:
    """A batch size's static cache, decoder, state buffers and captured steps, kept between `generate` calls: a
    graph replays the buffers it was captured with, so a later call of the same shape loads its prompts into
    them and replays the graphs it already has instead of capturing again."""

    def __init__(self, drafter, opts, batch_size: int, max_len: int, stop_ids: torch.Tensor, sampling: bool,
                 observe: bool, device: torch.device, compiled: bool = False, defer_capacity: int = 0):
        self.cache = drafter.new_cache(batch_size, max_len, static=True)
        self.generator = torch.Generator(device=device) if sampling else None
        self.decoder = Decoder(drafter, opts, self.cache, stop_ids, self.generator, observe, defer_capacity)
        # Sampling steps stay uncompiled: dynamo traces no torch.Generator, so they would not compile as one graph
        # (compiled piecewise, around each draw, they sampled unlike the eager step).
        self.run = GraphedSteps(self.decoder, compiled and not sampling)
        self.state: DecodeState | None = None
        self.sources: tuple = ()  # weak references to the storage of the model's weights and buffers

    def adopt(self, state: DecodeState) -> DecodeState:
        """Move a state into this session's buffers (the first state's tensors become them)."""
        self.state = _adopted(self.state, state)
        return self.state

    def prefill(self, prompt: DecodeState) -> tuple[DecodeState, StepResult]:
        """The prompt's step (`GraphedSteps.prefill`): the session's state after it, and its result."""
        self.state, result = self.run.prefill(prompt, self.state)
        return self.state, result

    def continue_draws(self, other: DecodeSession) -> DecodeSession:
        """This session, drawing on where `other`'s generator is (a batch moved into it: its draws go on, not
        start over from the call's seed)."""
        if self.generator is not None and other is not self:
            self.generator.set_state(other.generator.get_state())
        return self

    def take_rows(self, other: DecodeSession, index: torch.Tensor) -> DecodeState:
        """Load rows `index` of a larger session's cache and state into this one (a shrinking batch)."""
        self.cache.load_rows([(other.cache, index)])
        return self.adopt(other.state.select(index))


class DecodeSessions:
    """The sessions of one model, by shape and decoding options, the most recently used ones: at most `limit`,
    and besides the one in use no more than `cache_bytes` of key/value caches between them (None: a quarter of
    the GPU's memory). A benchmark's rows each keep a session per cache size (a dozen methods, two or three
    sizes): all of them stay captured, while a large model's batch caches (gigabytes each) are not hoarded.
    Kept on the model (a copy or a pickle of the model starts with none: graphs do not copy)."""

    def __init__(self, limit: int = 64, cache_bytes: int | None = None):
        self.limit, self.cache_bytes = limit, cache_bytes
        self.sessions: dict[tuple, DecodeSession] = {}
        self.in_use = threading.Lock()  # held by the `generate` call decoding in them (`leased_sessions`)

    def get(self, key: tuple, weights: int, make) -> DecodeSession:
        """The session for `key` (made on first use); sessions over other weights (a model since moved or cast,
        or whose weights' storage was freed) are dropped with their graphs and caches, and the least recently used
        while there are too many."""
        self.sessions = {k: v for k, v in self.sessions.items() if k[0] == weights and not outlived(v.sources)}
        session = self.sessions.pop(key, None) or make()
        self.sessions[key] = session  # most recent last
        budget = self.cache_bytes if self.cache_bytes is not None else _cache_budget(session.cache)
        held = sum(s.cache.nbytes for s in self.sessions.values()) - session.cache.nbytes  # the others'
        while len(self.sessions) > 1 and (len(self.sessions) > self.limit or held > budget):
            held -= self.sessions.pop(next(iter(self.sessions))).cache.nbytes
        return session

    def __deepcopy__(self, memo) -> DecodeSessions:
        return DecodeSessions(self.limit, self.cache_bytes)

    def __getstate__(self) -> dict:
        return {"limit": self.limit, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict) -> None:  # (a pickled model's sessions: none, and a lock of their own)
        self.__init__(state["limit"], state["cache_bytes"])


@contextlib.contextmanager
def leased_sessions(model):
    """The model's sessions for one `generate` call. A session's buffers, cache and graphs are its call's while it
    decodes, so a second call at the same time (another thread, or a streamer's own `generate` on the same model)
    gets sessions of its own for the call (captured anew, then dropped) instead of writing into the first's."""
    sessions = model_sessions(model)
    if not sessions.in_use.acquire(blocking=False):
        yield DecodeSessions(sessions.limit, sessions.cache_bytes)
        return
    try:
        yield sessions
    finally:
        sessions.in_use.release()


def model_sessions(model) -> DecodeSessions:
    """The sessions kept on `model` (made on first use; one, if two threads race)."""
    sessions = model.__dict__.get("_mtp_decode_sessions")
    return sessions if sessions is not None else model.__dict__.setdefault("_mtp_decode_sessions", DecodeSessions())


def _cache_budget(cache) -> float:
    """Bytes of caches the sessions may keep: a quarter of a GPU's memory (no bound off CUDA)."""
    device = cache.valid.device
    return torch.cuda.get_device_properties(device).total_memory / 4 if device.type == "cuda" else float("inf")


SLOT_BUCKET = 128  # cache lengths are rounded up to this: prompts of similar length share a session


def session_for(model, drafter, opts, batch_size: int, need: int, stop_ids: torch.Tensor,
                generator: torch.Generator | None, observe: bool, compiled: bool = False,
                defer_capacity: int = 0, joining: bool = False,
                sessions: DecodeSessions | None = None) -> DecodeSession:
    """The session for this shape and these options (made and remembered on first use). Its key holds the
    addresses of the model's weights and buffers and their versions: a model whose tensors were replaced (moved,
    cast, another draft vocabulary) or changed in place (an optimizer's step, `load_state_dict`) gets new graphs -
    a graph replays the tensors it was captured with, and the copies made from them (fused projections, stacked
    heads, the draft vocabulary's rows). `joining`: the session in which prompts that join a running batch take
    their step (one of its own: the batch's session of that size may be the one decoding)."""
    max_len = -(-need // SLOT_BUCKET) * SLOT_BUCKET
    tensors = [*model.parameters(), *model.buffers()]
    weights = hash(weights_state(tensors))
    # (a call's penalty and sampling values are inputs of its steps, in the state: whether there are any, and which
    # filters run, shapes them; and the largest top-k, the width of the top its rows' k-th logits are read from)
    fields = opts.shape_key(adaptive_draft=False)
    key = (weights, batch_size, max_len, fields, tuple(stop_ids.tolist()), generator is not None, observe, compiled,
           defer_capacity, joining)
    sessions = sessions if sessions is not None else model_sessions(model)  # (the call's: `leased_sessions`)

    def make() -> DecodeSession:
        made = DecodeSession(drafter, opts, batch_size, max_len, stop_ids, generator is not None, observe,
                             stop_ids.device, compiled, defer_capacity)
        made.sources = storage_refs(tensors)  # (a session whose tensors' storage was freed is not reused)
        return made

    session = sessions.get(key, weights, make)
    if generator is not None:  # the call's seed; the graphs draw from the session's generator
        session.generator.set_state(generator.get_state())
    return session
