"""`mtp train` under torchrun: two gloo processes on the CPU against one process with the same global batch.

Each torchrun launch costs ~10 s of imports on two cores, so the tests launch as few as they can and check
several things per launch.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_commands import write_data
from training_helpers import folder_tensors, tiny_llama, train_tokenizer

import mtp
from mtp.errors import MTPError
from mtp.models.safetensors_io import INDEX_NAME, SHARD_NAMES, has_weights
from mtp.training.checkpoints import is_sharded
from mtp.training.commands import train
from mtp.training.distributed import load_sharded, safe_reader
from mtp.training.targets import CACHE_NAME

SRC = str(Path(mtp.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    tok = train_tokenizer()
    folder = tmp_path_factory.mktemp("dist") / "hf-llama"
    model = tiny_llama(vocab_size=len(tok), num_heads=1, tokenizer=tok)
    model.base.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def flags(args: dict) -> list[str]:
    out = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + name.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def torchrun(args: dict, nproc: int = 2, wait: bool = True):
    """`torchrun --standalone --nproc-per-node N -m mtp train ...` (a free port: other runs may share the host)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "mtp", "train", *flags(args)]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    log = Path(args["output"]).with_suffix(".log")  # a file, not a pipe: nobody reads while it runs
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    proc.wait(timeout=300)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def steps(folder) -> list[dict]:
    lines = [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "eval" not in x]


def assert_same_run(a, b, atol: float = 2e-5) -> None:
    """The same losses per step and head, and the same final weights, within float tolerance (AdamW turns a
    rounding difference in a near-zero gradient into an lr-sized step, so weights get the looser one)."""
    sa, sb = steps(a), steps(b)
    assert [x["step"] for x in sa] == [x["step"] for x in sb]
    for x, y in zip(sa, sb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol), (x, y)
        for u, v in zip(x["head_loss"], y["head_loss"], strict=True):
            assert (u is None) == (v is None) and (u is None or u == pytest.approx(v, abs=atol)), (x, y)
        assert x["tokens"] == y["tokens"]
    wa, wb = folder_tensors(a), folder_tensors(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-4, rtol=1e-3, msg=name)


def worker_pids(pid: int) -> list[int]:
    """The processes torchrun started (each in a session of its own, so not in torchrun's process group)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_heads_two_processes_equal_one_kill_and_resume(tmp_path, hf_folder) -> None:
    """Frozen trunk, self-distilled answers written in parallel, FSDP: killed after a sharded checkpoint,
    resumed by two processes with DDP; losses and weights equal a single process's with the same batch."""
    data = write_data(tmp_path / "d.jsonl", n=15)
    args = {"model": hf_folder, "data": data, "steps": 10, "batch_size": 4, "seq_len": 64, "num_heads": 3,
            "holdout": 0.2, "freeze_trunk": True, "targets": "self", "max_new_tokens": 10, "draft_vocab": 40,
            "lr": 1e-3, "save_every": 2, "progress": False, "threads": 1}
    two = tmp_path / "two"
    proc = torchrun({**args, "parallel": "fsdp", "output": two}, wait=False)
    deadline = time.monotonic() + 240
    while not (two / "checkpoints" / "step-000002").is_dir() and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    for pid in worker_pids(proc.pid):  # a kill, not a Ctrl-C: no chance to save or clean up
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    out = (tmp_path / "two.log").read_text()
    killed = proc.returncode != 0
    assert (two / "checkpoints").is_dir(), out[-3000:]
    saved = sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved and all((two / "checkpoints" / s / "sharded" / ".metadata").is_file() for s in saved), out[-2000:]
    assert len((two / CACHE_NAME).read_text().splitlines()) == 15  # both ranks' shares, merged
    assert not list(two.glob("self_targets.rank*"))
    if killed:
        assert not (two / "config.json").exists()
    torchrun({"output": two, "resume": True, "parallel": "ddp", "progress": False, "threads": 1})

    # Each rank recorded the trunk features of the questions it answered, in a file pair of its own.
    assert sorted(p.name for p in two.glob("trunk_features*")) == [
        f"trunk_features.rank{r}.{ext}" for r in (0, 1) for ext in ("bin", "jsonl")]

    # One process, the same global batch, the answers and trunk features the two processes wrote (a cache any
    # world size reuses).
    one = tmp_path / "one"
    one.mkdir()
    for path in [two / CACHE_NAME, *two.glob("trunk_features*")]:
        shutil.copy(path, one / path.name)
    assert train(output=str(one), **args) == 0
    assert len((one / CACHE_NAME).read_text().splitlines()) == 15  # reused, nothing answered again
    assert not (one / "trunk_features.bin").exists()  # every row's features found: none computed
    assert_same_run(one, two)
    trained, start = folder_tensors(two), load_file(f"{hf_folder}/model.safetensors")
    assert (two / SHARD_NAMES[0]).is_file()  # the frozen weights apart, as one process writes them
    for name, tensor in start.items():  # the frozen trunk and head 0 are exactly the base model
        assert torch.equal(trained[name], tensor), name
    # ... and never had optimizer state: the shards hold moments of the extra heads (and their next-token input) only
    last = sorted((two / "checkpoints").iterdir())[-1]
    index = safe_reader(last / "sharded").read_metadata()
    trained_parts = ("extra_heads.", "next_token_in.")
    moments = [k for k in index.state_dict_metadata if k.startswith("optimizer.")]
    assert moments and all(k.removeprefix("optimizer.").startswith(trained_parts) for k in moments), moments[:5]
    assert any(k.startswith("optimizer.next_token_in.") for k in moments)
    weights = [k for k in index.state_dict_metadata if k.startswith("model.")]  # frozen ones: the start model's
    assert weights and all(k.removeprefix("model.").startswith(trained_parts) for k in weights), weights[:5]
    assert not [p for p in two.iterdir() if p.name.startswith(".")]
    assert not [p for p in (two / "checkpoints").iterdir() if p.name.startswith(".")]


def cut_at(run: Path, step: int) -> None:
    """What a kill just after the checkpoint of `step` leaves: no model folder, no later checkpoints, and a
    checkpoint write that was killed half-way."""
    for name in ("model.safetensors", *SHARD_NAMES, INDEX_NAME, "config.json", "eval.json"):
        (run / name).unlink(missing_ok=True)
    for folder in (run / "checkpoints").iterdir():
        if int(folder.name.removeprefix("step-")) > step:
            shutil.rmtree(folder)
    (run / "checkpoints" / f".step-{step + 2:06d}.tmp-999999999-x" / "sharded").mkdir(parents=True)


def test_selfdistill_resumes_across_world_sizes(tmp_path, hf_folder) -> None:
    """Full fine-tuning with a sharded student and a sharded frozen teacher: one process's checkpoint resumed
    by two, whose sharded checkpoint is resumed by one again; every step's losses and the final weights equal
    those of one uninterrupted process with the same batch."""
    data = write_data(tmp_path / "d.jsonl", n=14)
    args = {"model": hf_folder, "data": data, "method": "selfdistill", "adapter": "full", "steps": 6,
            "batch_size": 4, "seq_len": 48, "regions": 2, "k_min": 2, "k_max": 3, "loss_on": "all",
            "holdout": 0.2, "lr": 1e-3, "save_every": 2, "keep_checkpoints": 3, "progress": False, "threads": 1}
    one = tmp_path / "one"
    assert train(output=str(one), **args) == 0

    two = tmp_path / "two"
    shutil.copytree(one, two)
    cut_at(two, 2)
    torchrun({"output": two, "resume": True, "parallel": "fsdp", "save_every": 2, "keep_checkpoints": 3, "progress": False,
              "threads": 1})
    assert [is_sharded(two / "checkpoints" / f"step-{s:06d}") for s in (2, 4, 6)] == [False, True, True]
    assert_same_run(one, two)
    assert json.loads((two / "eval.json").read_text())["head_accuracy"] == \
        pytest.approx(json.loads((one / "eval.json").read_text())["head_accuracy"])

    back = tmp_path / "back"
    shutil.copytree(two, back)
    cut_at(back, 4)
    assert train(output=str(back), resume=True, progress=False, threads=1) == 0
    assert_same_run(one, back)
    assert not [p for p in (back / "checkpoints").iterdir() if p.name.startswith(".")]


def test_train_minutes_under_torchrun_every_process_stops_at_the_same_step(tmp_path, hf_folder) -> None:
    """--train-minutes with two processes: both pace at step 10 on the same numbers (their mean pace and
    elapsed time), so the budget ends them together (a process one step ahead would wait forever for the other's
    collectives); a budget spent by then ends the run at 10."""
    data = write_data(tmp_path / "d.jsonl", n=12)
    out = tmp_path / "paced"
    log = torchrun({"model": hf_folder, "data": data, "batch_size": 2, "seq_len": 48, "num_heads": 2,
                    "freeze_trunk": True, "holdout": 0.0, "train_minutes": 0.0001, "parallel": "ddp",
                    "save_every": 0, "progress": False, "threads": 1, "output": out})
    assert log.count("steps in about 0.0001 min (--train-minutes)") == 1, log[-2000:]  # printed by rank 0
    assert "after step 10: 10 steps" in log
    assert [x["step"] for x in steps(out)] == list(range(1, 11))
    assert has_weights(out) and (out / "config.json").is_file()


def test_parallel_needs_torchrun_and_torchrun_needs_parallel(tmp_path, hf_folder, monkeypatch) -> None:
    data = write_data(tmp_path / "d.jsonl", n=4)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MTPError, match="runs under torchrun"):
        train(output=str(tmp_path / "a"), model=hf_folder, data=data, parallel="fsdp", progress=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MTPError, match="give --parallel"):
        train(output=str(tmp_path / "b"), model=hf_folder, data=data, progress=False)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_checkpoint_index_runs_no_code(tmp_path) -> None:
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(MTPError, match="refusing posix.system|refusing os.system"):
        safe_reader(folder).read_metadata()
    model = torch.nn.Linear(2, 2)  # ... and resuming from it is one line, not a traceback (one process, no dist)
    with pytest.raises(MTPError, match="cannot load this sharded checkpoint"):
        load_sharded(folder, model, torch.optim.AdamW(model.parameters()), [])


def _global_call(module: str, name: str, argument: str) -> bytes:
    """A pickle (protocol 4) that calls module.name(argument): STACK_GLOBAL, which looks a dotted name up
    attribute by attribute, then REDUCE."""
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s.encode())]) + s.encode()  # SHORT_BINUNICODE

    return b"\x80\x04" + text(module) + text(name) + b"\x93" + text(argument) + b"\x85R."


@pytest.mark.parametrize("module", ["torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem"])
def test_checkpoint_index_runs_no_code_reached_through_its_own_modules(tmp_path, module) -> None:
    """The index's modules import os: "os.system" named in one of them is os.system (it ran)."""
    folder, marker = tmp_path / "sharded", tmp_path / "ran"
    folder.mkdir()
    (folder / ".metadata").write_bytes(_global_call(module, "os.system", f"touch {marker}"))
    with pytest.raises(MTPError, match=f"refusing {module}.os.system"):
        safe_reader(folder).read_metadata()
    assert not marker.exists()
