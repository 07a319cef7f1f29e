"""Training memory does not grow with the size of the data: `mtp train --targets self --freeze-trunk` on 2,000 and
on 20,000 short questions peaks within a few MB of each other (the trunk features go to disk, rows are int32)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from training_helpers import tiny_llama, train_tokenizer

import mtp

SRC = str(Path(mtp.__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    tok = train_tokenizer()
    folder = tmp_path_factory.mktemp("memory") / "model"
    # (two layers, a trunk of one: answering is most of the test's time, and what a leak would hold, the rows'
    # trunk features or token lists, is as large at any depth)
    tiny_llama(vocab_size=len(tok), num_heads=3, num_layers=2, tokenizer=tok).save_pretrained(folder)
    return folder


# `mtp train` in a child, with the peak resident memory of answering (up to the trunk cache) and of the rest
# (trunk cache, training, held-out evaluation) measured apart: the second phase's peak is below the first's, so
# the run's peak alone would hide it.
DRIVER = """
import json, sys
import mtp.training.loop as loop
from mtp.cli import run
from mtp.memory import peak, reset_peak
peaks, prepare = {}, loop.Trainer.prepare
def measured(self):
    peaks["answering"] = peak()
    reset_peak()
    prepare(self)
loop.Trainer.prepare = measured
code = run(sys.argv[2:])
peaks["training"] = peak()
json.dump(peaks, open(sys.argv[1], "w"))
sys.exit(code)
"""


def start_run(model: Path, folder: Path, rows: int) -> subprocess.Popen:
    """`mtp train` answering `rows` questions and training 3 steps on them, in a child process of one thread."""
    data = folder / f"questions{rows}.jsonl"
    with data.open("w") as f:
        for i in range(rows):
            question = f"Tom has {i} apples and buys {i % 7 + 1} more at the market. How many apples has he now?"
            f.write(json.dumps({"question": question, "answer": str(i)}) + "\n")
    args = ["train", "--model", str(model), "--data", str(data), "--output", str(folder / f"run{rows}"),
            "--freeze-trunk", "--targets", "self", "--max-new-tokens", "1", "--gen-batch-size", "1000", "--seq-len",
            "64", "--steps", "3", "--template", "plain", "--holdout", "0.001", "--draft-vocab", "0", "--save-every",
            "0", "--no-progress", "--threads", "1"]
    # glibc serves a block below a threshold it raises as big blocks are freed from its heap, where a batch's
    # tensors land wherever the last ones left holes: the peak of a batch then varies by tens of MB from batch to
    # batch, and the most of 20 batches exceeds the most of 2. A fixed threshold takes that out of the comparison.
    env = {**os.environ, "PYTHONPATH": SRC, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(folder / f"peaks{rows}.json"), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def peaks_gb(run: subprocess.Popen, folder: Path, rows: int) -> dict[str, float]:
    """Peak resident memory (GB) of the run's answering and of the rest, once it ended."""
    _, stderr = run.communicate()
    assert run.returncode == 0, stderr[-3000:]
    out = folder / f"run{rows}"
    assert (out / "trunk_features.bin").stat().st_size > rows * 25 * 32 * 2  # every row's features: on disk
    assert json.loads((out / "eval.json").read_text())["peak_memory_gb"]["host"] > 0.1  # reported
    return {k: v / 1e9 for k, v in json.loads((folder / f"peaks{rows}.json").read_text()).items()}


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="measures resident memory on Linux")
def test_answering_and_training_memory_does_not_grow_with_the_rows(model_folder, tmp_path) -> None:
    # Both at once, a core each: a process's peak is its own (the larger run takes ~3x the smaller's time)
    runs = {rows: start_run(model_folder, tmp_path, rows) for rows in (20_000, 2_000)}
    large, small = (peaks_gb(run, tmp_path, rows) for rows, run in runs.items())
    # The 18,000 more rows' trunk features (~54 positions x 32) held in memory would add 0.06 GB in fp16, Python
    # lists of their tokens 0.02 GB; their int32 rows add 4 MB.
    for phase in ("answering", "training"):
        assert large[phase] - small[phase] < 0.03, (phase, small, large)
