"""The frozen trunk's outputs on disk (`mtp.training.features`): read back as written, kept by a killed run,
recorded while answering, and training on them as on features held in memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_loop import cfg, make_data
from test_targets import QUESTIONS, CountingGenerate
from training_helpers import tiny_llama, train_tokenizer

import mtp
from mtp.errors import MTPError
from mtp.training.data import Example
from mtp.training.features import FeatureRecorder, FeatureStore, compute_trunk_features
from mtp.training.loop import Trainer
from mtp.training.targets import model_fingerprint, self_distilled_data

SRC = str(Path(mtp.__file__).resolve().parents[1])
HERE = str(Path(__file__).resolve().parent)


def rows_of(store: FeatureStore, lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [store.to_storage(torch.randn(n, store.hidden_size, generator=g)) for n in lengths]


def test_features_read_back_as_written(tmp_path) -> None:
    store = FeatureStore(tmp_path, "model-a", hidden_size=8)
    tokens = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [1, 2, 3, 4]]
    keys = [store.key(t) for t in tokens]
    rows = rows_of(store, [3, 2, 4, 4])
    store.write(keys[:2], rows[:2])  # two blocks
    store.write(keys[2:3], rows[2:3])
    store.close()
    # a repeated row shares its features; an unknown one is missing
    stored = store.lookup([keys[1], keys[0], keys[2], keys[3], keys[0]])
    assert stored.missing().tolist() == [3]
    got = stored[torch.tensor([0, 1, 2, 4]), :5]  # (4, 5, 8): zero past each row
    assert got.shape == (4, 5, 8) and got.dtype == torch.float16
    for b, row in enumerate([rows[1], rows[0], rows[2], rows[0]]):
        assert torch.equal(got[b, : len(row)], row) and not got[b, len(row):].any()
    assert torch.equal(stored[0:2, :2], got[:2, :2])  # a slice of rows, fewer positions
    with pytest.raises(MTPError, match="no stored trunk features"):
        stored[torch.tensor([3]), :4]
    # another model's key never matches; another width or dtype is another store: its files start over
    other = FeatureStore(tmp_path, "model-b", 8)
    assert len(other.lookup([other.key(t) for t in tokens]).missing()) == 4
    wider = FeatureStore(tmp_path, "model-a", hidden_size=16)
    assert len(wider.lookup(keys).missing()) == 4
    wider.write(keys[:1], rows_of(wider, [3]))
    assert len(store.lookup(keys).missing()) == 4
    with pytest.raises(MTPError, match="float16's range"):
        store.to_storage(torch.full((2, 8), 1e6))


def test_a_killed_write_leaves_every_complete_row(tmp_path) -> None:
    store = FeatureStore(tmp_path, "m", hidden_size=4)
    keys = [store.key([i]) for i in range(4)]
    rows = rows_of(store, [2, 3, 1, 2])
    store.write(keys[:2], rows[:2])
    store.close()
    with (tmp_path / "trunk_features.bin").open("ab") as f:
        f.write(b"\x01" * 10)  # a block the kill cut short, never indexed
    with (tmp_path / "trunk_features.jsonl").open("a") as f:
        f.write('{"key": "' + keys[2] + '", "offs')  # and its index line cut off
    later = FeatureStore(tmp_path, "m", hidden_size=4)
    later.write(keys[2:], rows[2:])
    stored = later.lookup(keys)
    assert len(stored.missing()) == 0
    for i, row in enumerate(rows):
        assert torch.equal(stored[torch.tensor([i]), : len(row)][0], row)


def test_recorder_copies_each_call_and_skips_padding_and_rejected_drafts(tmp_path) -> None:
    store = FeatureStore(tmp_path, "m", hidden_size=2)
    recorder = FeatureRecorder(store, batch_size=2, capacity=4)
    trunk = torch.zeros(2, 3, 2)  # one buffer the caller reuses for every call, as the decoding loop may
    trunk[0], trunk[1] = torch.tensor([[9.0, 9], [1, 1], [2, 2]]), torch.tensor([[3.0, 3], [4, 4], [5, 5]])
    recorder(torch.tensor([0, 1]), trunk, torch.tensor([[False, True, True], [True, True, True]]))  # row 0: pad
    trunk.fill_(-1)
    trunk[0, 0], trunk[0, 2] = torch.tensor([6.0, 6]), torch.tensor([7.0, 7])
    recorder(torch.tensor([1]), trunk[:1], torch.tensor([[True, False, True]]))  # row 1 alone, a draft rejected
    recorder.write(["a", "b"], [3, 5])
    stored = store.lookup(["a", "b"])
    assert stored.positions.tolist() == [2, 4]  # row 0 saw 2 positions; row 1's fifth is past the capacity
    got = stored[torch.tensor([0, 1]), :4].float()
    assert got[0, :2].tolist() == [[1, 1], [2, 2]] and got[1].tolist() == [[3, 3], [4, 4], [5, 5], [6, 6]]


def recorded_row_by_row(calls, batch_size: int, capacity: int, hidden: int) -> tuple[torch.Tensor, list[int]]:
    """What a recorder holds after `calls` ((rows, trunk, kept) each), kept one row at a time: the reference."""
    buffer, filled = torch.zeros(batch_size, capacity, hidden, dtype=torch.float16), [0] * batch_size
    for rows, trunk, kept in calls:
        for b, row in enumerate(rows.tolist()):
            mine = trunk[b][kept[b]].half()
            take = max(0, min(len(mine), capacity - filled[row]))
            buffer[row, filled[row]:filled[row] + take] = mine[:take]
            filled[row] += len(mine)
    return buffer, filled


@pytest.mark.parametrize("seed", range(6))
def test_the_recorder_keeps_what_a_row_by_row_copy_keeps(tmp_path, seed) -> None:
    """Random batches that shrink, kept positions anywhere in a block (padding, rejected tree nodes), rows past
    their capacity: the buffer and the counts a row-by-row copy gives."""
    g = torch.Generator().manual_seed(seed)
    batch_size, capacity, hidden = 6, 9, 3
    recorder = FeatureRecorder(FeatureStore(tmp_path, "m", hidden_size=hidden), batch_size, capacity)
    calls, rows = [], torch.arange(batch_size)
    for i in range(6):
        shrunk = rows[torch.randperm(len(rows), generator=g)][: max(1, len(rows) - int(torch.randint(0, 2, (1,), generator=g)))]
        rows = shrunk if i < 5 else torch.tensor([int(rows[0])])  # the last: one row, a block past its capacity
        width = int(torch.randint(1, 5, (1,), generator=g)) if i < 5 else capacity
        trunk = torch.randn(len(rows), width, hidden, generator=g)
        kept = torch.rand(len(rows), width, generator=g) < 0.6 if i < 5 else torch.ones(1, width, dtype=torch.bool)
        calls.append((rows.clone(), trunk.clone(), kept.clone()))
        recorder(rows, trunk, kept)
        trunk.fill_(float("nan"))  # (the caller's buffers, reused: the recorder copied what it keeps)
    buffer, filled = recorded_row_by_row(calls, batch_size, capacity, hidden)
    assert recorder.filled.tolist() == filled and max(filled) > capacity and min(filled) < capacity
    for row in range(batch_size):
        n = min(filled[row], capacity)
        assert torch.equal(recorder.buffer[row, :n], buffer[row, :n]), row


@pytest.mark.cuda
def test_the_recorder_keeps_from_the_gpu_what_it_keeps_from_the_host(tmp_path) -> None:
    """Steps whose trunk outputs, kept positions and rows are on the GPU (answering there): the buffer a host
    batch gives."""
    g = torch.Generator().manual_seed(0)
    recorders = [FeatureRecorder(FeatureStore(tmp_path / d, "m", hidden_size=4), 3, 6) for d in ("cpu", "gpu")]
    for width in (5, 1, 3, 1):
        rows, trunk = torch.tensor([2, 0, 1]), torch.randn(3, width, 4, generator=g)
        kept = torch.rand(3, width, generator=g) < 0.7
        recorders[0](rows, trunk, kept)
        recorders[1](rows.cuda(), trunk.cuda(), kept.cuda())
    assert recorders[0].filled.tolist() == recorders[1].filled.tolist() and recorders[1].buffer.is_cuda
    for row, n in enumerate(recorders[0].filled.tolist()):
        assert torch.equal(recorders[0].buffer[row, :min(n, 6)], recorders[1].buffer[row, :min(n, 6)].cpu())


def test_a_recorder_call_reads_nothing_back_to_the_host(tmp_path) -> None:
    """A call only queues device work (generate calls it before launching the next step): on meta tensors, which
    hold no values, any host read (.tolist(), .item(), a nonzero) would raise."""
    recorder = FeatureRecorder(FeatureStore(tmp_path, "m", hidden_size=4), 3, 8)
    for width in (5, 2):
        recorder(torch.tensor([0, 2], device="meta"), torch.randn(2, width, 4, device="meta"),
                 torch.ones(2, width, dtype=torch.bool, device="meta"))
    assert recorder.buffer.device.type == "meta" and recorder.queues_only
    with pytest.raises(NotImplementedError):  # (the check itself: a meta tensor's host read raises)
        torch.ones(2, device="meta").tolist()


def test_a_value_float16_cannot_hold_is_one_error_at_write(tmp_path) -> None:
    """A float16 store's recorder checks its values' range where it writes them (a call reads nothing back); a
    call whose outputs hold a NaN is not checked, as `to_storage` does not check one."""
    rows, kept = torch.tensor([0]), torch.ones(1, 2, dtype=torch.bool)
    recorder = FeatureRecorder(FeatureStore(tmp_path / "a", "m", hidden_size=2), 1, 8)
    recorder(rows, torch.tensor([[[1.0, 2.0], [float("nan"), 1e6]]]), kept)
    recorder(rows, torch.tensor([[[3.0, -60000.0], [4.0, 5.0]]]), kept)
    recorder.write(["a"], [4])  # (the NaN call's 1e6: not checked; 60,000 fits)
    assert FeatureStore(tmp_path / "a", "m", hidden_size=2).lookup(["a"]).positions.tolist() == [4]
    recorder = FeatureRecorder(FeatureStore(tmp_path / "b", "m", hidden_size=2), 1, 8)
    recorder(rows, torch.tensor([[[1.0, -70000.0], [4.0, 5.0]]]), kept)
    with pytest.raises(MTPError, match="up to 70000 exceed float16's range"):
        recorder.write(["b"], [2])
    assert not (tmp_path / "b" / "trunk_features.bin").exists()


def test_the_recorders_work_does_not_grow_with_the_rows(tmp_path) -> None:
    """One step of a batch of 4 rows and of 256: the same few ops (on a GPU each op on a row's positions was a
    host read or a launch, per row and step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counted = []
    for batch in (4, 256):
        recorder = FeatureRecorder(FeatureStore(tmp_path, "m", hidden_size=8), batch, 16)
        kept = torch.ones(batch, 3, dtype=torch.bool)
        kept[::2, 1] = False
        with Count() as count:
            recorder(torch.arange(batch), torch.randn(batch, 3, 8), kept)
        counted.append(count.ops)
    assert counted[0] == counted[1] < 40, counted


def test_training_on_disk_features_equals_training_on_memory_and_reuses_them(tmp_path, monkeypatch) -> None:
    """The store's fp16 features give the losses that fp32 features in memory give (within fp16 rounding); a
    second run with the same store (a resumed one) computes nothing."""
    import mtp.training.features as features

    data, held = make_data(rows=6), make_data(rows=3, seed=4)
    runs = []
    for mode in ("device", "disk"):
        model = tiny_llama(num_heads=3)
        store = FeatureStore.for_model(tmp_path / "run", model, model_fingerprint(model)) if mode == "disk" else None
        trainer = Trainer(model, data, cfg(steps=5, batch_size=3, freeze_trunk=True, trunk_cache=mode),
                          eval_data=held, feature_store=store)
        runs.append(trainer.train())
        assert trainer.trunk_cache == mode
    for a, b in zip(runs[0].history, runs[1].history, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-3)
    assert runs[0].evaluation.head_loss == pytest.approx(runs[1].evaluation.head_loss, rel=1e-3)

    def no_trunk_pass(*args, **kwargs):
        raise AssertionError("the trunk ran again")

    monkeypatch.setattr(features, "trunk_batches", no_trunk_pass)
    again = Trainer(model, data, cfg(steps=5, batch_size=3, freeze_trunk=True, trunk_cache="disk"),
                    eval_data=held, feature_store=store)
    again.prepare()
    assert torch.equal(again.features[torch.arange(6), :16], trainer.features[torch.arange(6), :16])
    with pytest.raises(MTPError, match="feature store"):
        Trainer(model, data, cfg(steps=1, freeze_trunk=True, trunk_cache="disk"))


KILLED_ANSWERING = """
import os, signal, sys
import mtp.decoding.generate as gen
from training_helpers import tiny_llama, train_tokenizer
from test_features import answer_with_features
real, calls = gen.generate, []
def generate(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:  # the first batch's answers and features are written: kill -9 while answering the next
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
gen.generate = generate
answer_with_features(sys.argv[1])
"""


def answer_with_features(folder: str):
    """Self-distilled rows of QUESTIONS with their trunk features recorded into `folder` (also run by a child)."""
    tok = train_tokenizer()
    model = tiny_llama(vocab_size=len(tok), num_heads=3, tokenizer=tok)
    store = FeatureStore.for_model(folder, model, model_fingerprint(model))
    data = self_distilled_data(model, tok, [[Example(q, "") for q in QUESTIONS]], template="plain", seq_len=40,
                               max_new_tokens=6, cache_path=Path(folder) / "answers.jsonl", batch_size=2,
                               progress=False, features=store)[0]
    return model, store, data


def test_resume_after_kill_9_mid_answering_reuses_answers_and_features(tmp_path, monkeypatch) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, HERE])}
    child = subprocess.run([sys.executable, "-c", KILLED_ANSWERING, str(tmp_path)], env=env, capture_output=True)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
    counting = CountingGenerate(monkeypatch)
    model, store, data = answer_with_features(str(tmp_path))
    assert sum(counting.rows) == len(QUESTIONS) - 2  # the killed run's two answers were reused
    index = [json.loads(line) for line in (tmp_path / "trunk_features.jsonl").read_text().splitlines()[1:]]
    assert len(index) == len(QUESTIONS)  # ... and their features: every row's recorded once
    stored = store.lookup([store.key(data.row(i)) for i in range(len(data))])
    expected = compute_trunk_features(model, data)
    for k, n in enumerate(data.lengths.tolist()):
        torch.testing.assert_close(stored[torch.tensor([k]), : n - 1][0].float(), expected[k, : n - 1],
                                   atol=2e-3, rtol=2e-3)


@pytest.mark.cuda
def test_features_recorded_while_answering_on_the_gpu_are_the_trunks(tmp_path) -> None:
    """Answering on the GPU (replayed steps launched ahead, the recorder's copies queued before each next step):
    every row's recorded features are the trunk's outputs over its sequence."""
    tok = train_tokenizer()
    model = tiny_llama(vocab_size=len(tok), num_heads=3, tokenizer=tok).to("cuda")
    store = FeatureStore.for_model(tmp_path, model, model_fingerprint(model))
    data = self_distilled_data(model, tok, [[Example(q, "") for q in QUESTIONS]], template="plain", seq_len=40,
                               max_new_tokens=6, batch_size=4, progress=False, features=store)[0]
    stored = store.lookup([store.key(data.row(i)) for i in range(len(data))])
    expected = compute_trunk_features(model, data).cpu()
    assert len(stored.missing()) == 0
    for k, n in enumerate(data.lengths.tolist()):
        torch.testing.assert_close(stored[torch.tensor([k]), : n - 1][0].float(), expected[k, : n - 1],
                                   atol=2e-3, rtol=2e-3)


def test_a_cut_short_file_loses_its_tail_rows_not_their_places(tmp_path) -> None:
    """A .bin cut short (a bad copy, a full disk) and a run that appends after the cut: the rows whose bytes the
    cut took are missing (computed again), never read from the new rows' bytes that now sit where they were; the
    rows before the cut and the new ones read back as written. (Reading the new bytes as the old rows trained the
    heads on other rows' features, silently.)"""
    store = FeatureStore(tmp_path, "m", hidden_size=4)
    keys = [store.key([i]) for i in range(5)]
    rows = rows_of(store, [2, 3, 4, 3, 2])
    store.write(keys[:3], rows[:3])
    store.close()
    row_bytes = 4 * 2
    with (tmp_path / "trunk_features.bin").open("r+b") as f:
        f.truncate((2 + 1) * row_bytes)  # row 0 whole, row 1 cut after its first position, row 2 gone
    later = FeatureStore(tmp_path, "m", hidden_size=4)
    later.write(keys[3:], rows[3:])  # appended at the cut, over where rows 1 and 2 were
    stored = later.lookup(keys)
    assert stored.missing().tolist() == [1, 2]
    for i in (0, 3, 4):
        assert torch.equal(stored[torch.tensor([i]), : len(rows[i])][0], rows[i]), i
