"""Every error a user can cause is one line and exit code 2 (or works); nothing silent: a model of NaNs, a byte-order
mark, an option that would be ignored. Each case runs the command line in-process, as a user would."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from conftest import tiny_base, tiny_mtp, tiny_tokenizer
from mtp.errors import MTPError
from mtp.models.safetensors_io import SafetensorsReader, write_safetensors
from test_damaged_inputs import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny parallel-heads folder, a plain Hugging Face folder and a mask-token folder, one tokenizer."""
    from mtp.models.mask_tokens import MaskTokenModel

    root = tmp_path_factory.mktemp("models")
    tok = tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=3, vocab_size=len(tok))
    model.tokenizer = tok
    model.save_pretrained(root / "mtp")
    tiny_base("llama", vocab_size=len(tok)).save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    MaskTokenModel.from_base(tiny_base("llama", vocab_size=len(tok)), tokenizer=tiny_tokenizer()).save_pretrained(
        root / "mask")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"Janet has {i} eggs and {i + 1} ducks; the answer is {2 * i + 1}." for i in range(12)))
    return root


def assert_error(code: int, err: str, *needles: str) -> None:
    """`assert_one_line_error`, where transformers' loading progress bar (a plain folder) may come first."""
    lines = err.strip().splitlines()
    assert all("%|" in line for line in lines[:-1]), err
    assert_one_line_error(code, lines[-1] if lines else err, *needles)


def _copy(folders, name, tmp_path):
    return shutil.copytree(folders / name, tmp_path / name)


def _rewrite_weights(folder, edit):
    """model.safetensors again, with `edit(tensors)` applied."""
    path = folder / "model.safetensors"
    with SafetensorsReader(path) as reader:
        tensors = {name: reader.read(name) for name in reader.tensors}
    edit(tensors)
    write_safetensors(path, {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, tensors.__getitem__,
                      {"format": "pt"})


def _generate(folder, *extra):
    return ["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2", *extra]


# ------------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "hi", "--do-sample", "--seed", str(2**64)], "--seed must be in [0, 18446744073709551615]"),
    (["train", "--output", "o", "--seed", "-1"], "--seed must be in [0, 18446744073709551615], got -1"),
    (["generate", "--prompt", "hi", "--strategy", "speculative", "--tree-size", "100000"],
     "--tree-size must be in [1, 256], got 100000"),
    (["generate", "--prompt", "hi", "--k", "2"], "--k: tokens per forward of a multi-token strategy; greedy makes one"),
    (["train", "--output", "o", "--steps", "ten"], "mtp train: error: argument --steps: invalid int value: 'ten'"),
    (["generate", "--prompt", "hi", "--strategy", "fastest"], "argument --strategy: invalid choice: 'fastest'"),
])
def test_bad_flags_are_one_line_before_any_work(args, message, capsys):
    code, err = run_cli([*args, "--model", "/no/such/model"], capsys)
    assert_one_line_error(code, err, message)


def test_an_empty_output_path_is_refused(folders, tmp_path, monkeypatch, capsys):
    """`--output ""` (an unset variable in a script) names no folder: `mtp train` took it for the working
    directory and wrote the run there, checkpoints and model. Every command's output is checked alike."""
    from mtp.arguments import OUTPUTS, check_command_arguments

    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["train", "--model", folders / "hf", "--data", folders / "text.txt", "--output", "",
                         "--steps", "1", "--seq-len", "32", "--no-progress"], capsys)
    assert_error(code, err, "--output is empty")
    assert not list(tmp_path.iterdir())
    for command in OUTPUTS:
        with pytest.raises(MTPError, match="--output is empty"):
            check_command_arguments(command, {"output": ""})
    from mtp.training.commands import train

    with pytest.raises(MTPError, match="output is empty"):  # from Python, before any work
        train(output="", model=str(folders / "hf"), data=str(folders / "text.txt"), steps=1, seq_len=32)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["eval", "bench"])
@pytest.mark.parametrize("kind", ["mtp", "run"])
def test_reports_are_not_written_into_a_model_or_a_training_run(folders, tmp_path, command, kind, capsys):
    """Written among a model's files, eval's reports made its folder one `save_pretrained` refuses."""
    target = folders / "mtp" if kind == "mtp" else tmp_path / "run"
    if kind == "run":
        target.mkdir()
        (target / "train_config.json").write_text("{}")
    before = sorted(p.name for p in target.iterdir())
    code, err = run_cli([command, "--model", folders / "mtp", "--output", target], capsys)
    assert_one_line_error(code, err, f"--output {target} holds a {'model' if kind == 'mtp' else 'training run'}")
    assert sorted(p.name for p in target.iterdir()) == before


def test_the_python_api_checks_seeds_and_types(llama_mtp):
    from mtp.training.loop import TrainConfig

    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(MTPError, match=r"seed must be in \[0, 18446744073709551615\], got 18446744073709551616"):
        llama_mtp.generate(ids, do_sample=True, seed=2**64)
    with pytest.raises(MTPError, match="seed must be in"):
        TrainConfig(steps=1, seed=2**64).validate()
    with pytest.raises(MTPError, match="steps must be a number, got str '10'"):
        TrainConfig(steps="10").validate()
    with pytest.raises(MTPError, match="num_heads must be a number, got str"):
        type(llama_mtp)(tiny_base(), num_heads="3")
    with pytest.raises(MTPError, match="expected a transformers causal LM .* got str"):
        type(llama_mtp)("SmolLM2")
    with pytest.raises(MTPError, match="directory must be a path .* got NoneType"):
        type(llama_mtp).from_pretrained(None)
    with pytest.raises(MTPError, match="directory must be a path .* got int"):
        llama_mtp.save_pretrained(3)
    with pytest.raises(MTPError, match="temperature must be a number"):
        llama_mtp.generate(ids, do_sample=True, temperature="hot")


# ------------------------------------------------------------------------------------------------ tokenizers
def test_a_malformed_tokenizer_names_its_file(folders, tmp_path, capsys):
    folder = _copy(folders, "mtp", tmp_path)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    code, err = run_cli(_generate(folder), capsys)
    assert_one_line_error(code, err, f"cannot load the tokenizer of {folder} (tokenizer.json", "KeyError")


def test_a_broken_chat_template_names_its_file_and_line(folders, tmp_path, capsys):
    folder = _copy(folders, "mtp", tmp_path)
    (folder / "chat_template.jinja").write_text("{{ messages }}\n{% for m in %}")
    code, err = run_cli(_generate(folder, "--chat"), capsys)
    assert_one_line_error(code, err, f"{folder / 'chat_template.jinja'}:2: the chat template is not valid Jinja")


def test_chat_without_a_template(folders, tmp_path, capsys):
    folder = _copy(folders, "hf", tmp_path)
    (folder / "chat_template.jinja").unlink()
    code, err = run_cli(_generate(folder, "--chat"), capsys)
    assert_error(code, err, "--chat: the model's tokenizer has no chat template")


# ------------------------------------------------------------------------------------------------ model files
def test_weights_stored_as_integers(folders, tmp_path, capsys):
    folder = _copy(folders, "mtp", tmp_path)
    _rewrite_weights(folder, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    code, err = run_cli(_generate(folder), capsys)
    assert_one_line_error(code, err, "weights stored as integers, not floating point: model.norm.weight (I32)")


@pytest.mark.parametrize("kind", ["mtp", "hf", "mask"])
def test_nan_or_infinite_weights_are_an_error_not_garbage(folders, tmp_path, kind, capsys):
    folder = _copy(folders, kind, tmp_path)
    _rewrite_weights(folder, lambda t: t["model.layers.1.mlp.up_proj.weight"].__setitem__((0, 3), float("inf")))
    code, err = run_cli(_generate(folder), capsys)
    assert_error(code, err, "weight model.layers.1.mlp.up_proj.weight holds NaN or infinite values")


def test_tree_statistics_of_the_wrong_type(folders, tmp_path, capsys):
    folder = _copy(folders, "mtp", tmp_path)
    (folder / "eval.json").write_text(json.dumps({"head_rank_accuracy": [["0.5", "x"], [0.2]]}))
    code, err = run_cli(_generate(folder, "--strategy", "speculative", "--tree", "auto"), capsys)
    assert_one_line_error(code, err, f"{folder / 'eval.json'}: \"head_rank_accuracy\" must be a list per head")


def test_a_mask_token_folder_is_not_loaded_as_parallel_heads(folders):
    from mtp import MTPModel

    with pytest.raises(MTPError, match="is a mask-token model: load it with MaskTokenModel.from_pretrained"):
        MTPModel.from_pretrained(folders / "mask")


# ------------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("extra, message", [
    (["--method", "selfdistill", "--k", "1"], "k must satisfy 2 <= k_min <= k_max for self-distillation (--k, "
     "or --k-min and --k-max), got 1, 1"),
    (["--method", "selfdistill", "--k-min", "1", "--k-max", "3"], "2 <= k_min <= k_max for self-distillation"),
    (["--autocast", "float16"], "--autocast float16 needs a GPU"),
    (["--seq-len", "1000"], "--seq-len 1000 is longer than the model's context of 256 tokens"),
    (["--seq-len", "1000", "--pack"], "--seq-len 1000 is longer than the model's context of 256 tokens"),
])
def test_training_settings_that_cannot_run_are_refused_first(folders, tmp_path, extra, message, capsys):
    code, err = run_cli(["train", "--model", folders / "hf", "--data", folders / "text.txt", "--output",
                         tmp_path / "run", "--steps", "1", "--seq-len", "32", "--no-progress", *extra], capsys)
    assert_error(code, err, message)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_data_that_leaves_nothing_to_train_leaves_no_run_folder(folders, tmp_path, capsys):
    """Every answer cut off by --seq-len: one line, and no folder with a train_config.json that a second run
    would take for a run to resume."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": "Janet has 3 eggs and 4 ducks. " * 4, "answer": "7"}) + "\n"
                            for _ in range(6)))
    code, err = run_cli(["train", "--model", folders / "hf", "--data", data, "--output", tmp_path / "run",
                         "--steps", "1", "--seq-len", "8", "--no-progress"], capsys)
    assert_error(code, err, "no training tokens")
    assert not (tmp_path / "run").exists()


def test_bench_train_checks_the_sequence_length(folders, tmp_path, capsys):
    code, err = run_cli(["bench-train", "--model", folders / "hf", "--seq-len", "100000", "--num-heads", "2",
                         "--output", tmp_path / "b.json"], capsys)
    assert_error(code, err, "--seq-len 100000 is longer than the model's context of 256 tokens")


@pytest.mark.parametrize("kind", ["mtp", "mask"])
def test_bench_train_refuses_a_multi_token_model(folders, tmp_path, kind, capsys):
    """bench-train trains new heads on a plain model: an mtp folder is named as such, with what to give instead."""
    code, err = run_cli(["bench-train", "--model", folders / kind, "--output", tmp_path / "b.json"], capsys)
    assert_error(code, err, f"--model {folders / kind} is a multi-token model already; bench-train times training "
                 "new heads on a plain model")
    assert not (tmp_path / "b.json").exists()


def test_a_data_file_edited_before_resume_is_refused(folders, tmp_path, capsys):
    data = tmp_path / "d.txt"
    shutil.copy(folders / "text.txt", data)
    run = ["train", "--model", folders / "hf", "--data", data, "--output", tmp_path / "run", "--steps", "1",
           "--seq-len", "32", "--holdout", "0", "--no-progress"]
    code, err = run_cli(run, capsys)
    assert code == 0, err
    data.write_text(data.read_text() + "\n\nOne more document.")
    code, err = run_cli(["train", "--output", tmp_path / "run", "--resume", "--no-progress"], capsys)
    assert_error(code, err, f"--data {data} has changed since the run started")


def test_rows_cut_to_the_sequence_length_are_reported(caplog):
    from mtp.training.data import rows_to_data

    with caplog.at_level(logging.WARNING):
        data = rows_to_data([([1] * 10, [True] * 10), ([2] * 3, [True] * 3)], seq_len=4, pad_id=0)
    assert data.input_ids.shape == (2, 4)
    assert "cut 1 of 2 rows to seq_len=4 tokens" in caplog.text


# ------------------------------------------------------------------------------------------------ inputs
def test_a_byte_order_mark_is_stripped_from_text_and_jsonl(folders, tmp_path, capsys):
    from mtp.training.data import load_examples

    text, jsonl = tmp_path / "p.txt", tmp_path / "p.jsonl"
    text.write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "hello"}\n')
    for path, prompts in ((text, ["hello", "world"]), (jsonl, ["hello"])):
        out = tmp_path / f"{path.suffix[1:]}.jsonl"
        code, err = run_cli(["generate", "--model", folders / "mtp", "--prompts", path, "--max-new-tokens", "1",
                             "--output", out], capsys)
        assert code == 0, err
        assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == prompts
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"question": "q?", "answer": "a"}\n')
    assert [(e.prompt, e.answer) for e in load_examples(data)] == [("q?", "a")]


@pytest.mark.parametrize("args, message", [
    (lambda d, t: ["--prompts", d], "is a folder, not a prompts file"),
    (lambda d, t: ["--prompt", "hi", "--strategy", "speculative", "--tree", t / "missing.json"],
     "missing.json: file not found"),
    (lambda d, t: ["--prompts", d / "../text.txt", "--stream"], "--stream prints one prompt's text"),
    (lambda d, t: ["--prompt", "hi", "--stream", "--json"], "--stream prints one prompt's text as it is made: --json"),
])
def test_generate_says_what_is_wrong(folders, tmp_path, args, message, capsys):
    code, err = run_cli(["generate", "--model", folders / "mtp", *args(folders / "mtp", tmp_path)], capsys)
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize("other, message", [
    ("vocab", "has another tokenizer or vocabulary than --model"),
    ("base", "is another base model than --model: hidden_size 64 (not 32)"),
    ("context", "is another base model than --model: max_position_embeddings 128 (not 256)")])
def test_bench_also_needs_the_same_base_model(folders, tmp_path, other, message, capsys):
    tok = tiny_tokenizer(200) if other == "vocab" else tiny_tokenizer()
    model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok), hidden=64 if other == "base" else 32,
                     context=128 if other == "context" else 256)
    model.tokenizer = tok
    folder = model.save_pretrained(tmp_path / other)
    code, err = run_cli(["bench", "--model", folders / "mtp", "--also", folder, "--output", tmp_path / "b",
                         "--no-progress"], capsys)
    assert_one_line_error(code, err, f"--also {folder} {message}")
    assert not (tmp_path / "b").exists()


def test_the_lm_eval_route_without_lm_eval_is_one_line(tmp_path):
    """`python -m mtp.evaluation.lm_eval_adapter ...` (decoding.md's route) where lm-eval is not installed: one
    line naming what to install, exit 2, no traceback; the import from Python stays an ImportError."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("lm_eval") is not None:
        pytest.skip("lm-eval is installed here")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run([sys.executable, "-m", "mtp.evaluation.lm_eval_adapter", "--model", "mtp", "--tasks", "x"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == ("mtp: error: the lm-evaluation-harness adapter needs lm-eval: "
                                                    "pip install lm-eval")
    with pytest.raises(ImportError, match="pip install lm-eval"):
        import mtp.evaluation.lm_eval_adapter  # noqa: F401


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_from_pretrained_on_a_device_this_torch_cannot_use_is_an_mtp_error(folders):
    """Both model classes' `from_pretrained(device="cuda")` on a CPU-only torch: the MTPError `mtp.load` gives
    (it was torch's AssertionError "Torch not compiled with CUDA enabled")."""
    from mtp.models.mask_tokens import MaskTokenModel
    from mtp.models.parallel_heads import MTPModel

    for cls, folder in ((MTPModel, folders / "mtp"), (MaskTokenModel, folders / "mask")):
        with pytest.raises(MTPError, match="device cuda"):
            cls.from_pretrained(folder, device="cuda")


def test_from_pretrained_without_the_tokenizer_reads_none(folders):
    """`from_pretrained(load_tokenizer=False)` leaves the tokenizer out (the import of the function of that name
    inside it shadowed the argument: it always read it)."""
    from mtp.models.mask_tokens import MaskTokenModel
    from mtp.models.parallel_heads import MTPModel

    for cls, folder in ((MTPModel, folders / "mtp"), (MaskTokenModel, folders / "mask")):
        assert cls.from_pretrained(folder, load_tokenizer=False).tokenizer is None
        assert cls.from_pretrained(folder).tokenizer is not None


def test_a_tilde_in_output_means_home_everywhere(folders, tmp_path, monkeypatch, capsys):
    """`--output ~/x` is written under the home folder by `generate`, `convert` and `eval` (the first two wrote
    a folder named "~" in the working directory, after a check that had expanded it)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hi\n")
    common = ["--model", folders / "mtp", "--max-new-tokens", "2", "--no-progress"]
    assert run_cli(["generate", "--prompts", prompts, "--no-chat", *common, "--output", "~/g.jsonl"], capsys)[0] == 0
    assert run_cli(["convert", "--input", folders / "hf", "--output", "~/conv"], capsys)[0] == 0
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    assert run_cli(["eval", "--data", data, "--shots", "0", "--no-chat", *common, "--output", "~/ev"], capsys)[0] == 0
    assert (home / "g.jsonl").is_file() and (home / "conv" / "config.json").is_file()
    assert (home / "ev" / "summary.json").is_file() and list(work.iterdir()) == []


def test_a_model_packed_for_decoding_is_not_cast_loaded_or_trained():
    """A model packed for CPU decoding (decode-only blocked fp32, fp16-packed) refuses `.to(bf16)`, `.half()`,
    `load_state_dict` and a training forward with an MTPError (they failed later inside oneDNN or fbgemm, or
    trained nothing: no gradient reaches packed weights); `.to("cpu")` and `.float()` stay harmless."""
    from mtp.models.packed import blocked_available
    from mtp.models.quantize import block_for_decoding, quantize_for_decoding

    models = []
    if blocked_available():
        models.append(block_for_decoding(tiny_mtp("llama"), mapped=False))
    if "fbgemm" in torch.backends.quantized.supported_engines:
        models.append(quantize_for_decoding(tiny_mtp("llama"), "fp16"))
    if not models:
        pytest.skip("no packed CPU format here")
    ids = torch.tensor([[5, 6, 7]])
    for model in models:
        before = mtp_generate(model, ids)
        for change in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.double()):
            with pytest.raises(MTPError, match="packed for CPU decoding"):
                change(model)
        with pytest.raises(MTPError, match="load the weights into the model before packing"):
            model.load_state_dict(tiny_mtp("llama").state_dict())
        model.to("cpu").float()
        assert mtp_generate(model, ids) == before
    for model in (m for m in models if m.quantized is not None):
        with pytest.raises(MTPError, match="no gradient reaches them"):
            model.train()(ids)


def mtp_generate(model, ids):
    from mtp.decoding.generate import generate

    return generate(model.eval(), ids, max_new_tokens=4).tokens


def test_decoding_a_model_in_training_mode_warns_of_its_dropout():
    """GPT-2 in training mode (dropout on): decoding warns that its forwards are random (each call answered
    differently and speculative decoding no longer equalled greedy); in eval mode, nothing."""
    import warnings

    from mtp.decoding.generate import generate

    model = tiny_mtp("gpt2")
    with pytest.warns(UserWarning, match="training mode: its dropout"):
        generate(model.train(), [[5, 9, 3]], max_new_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model.eval(), [[5, 9, 3]], max_new_tokens=3)


def test_the_python_api_names_what_is_wrong():
    """Mistakes a library user makes are MTPErrors naming them (they were a TypeError, KeyError or a RuntimeError
    from topk deep inside); numpy integers count as integers."""
    import numpy as np

    from mtp.decoding.generate import generate
    from mtp.decoding.tree import DraftTree
    from mtp.models.parallel_heads import MTPModel

    model = tiny_mtp("llama", num_heads=3)
    assert generate(model, [[5, 6]], max_new_tokens=np.int64(3)).tokens == generate(model, [[5, 6]],
                                                                                     max_new_tokens=3).tokens
    with pytest.raises(MTPError, match="max_new_tokens must be an int"):
        generate(model, [[5, 6]], max_new_tokens=5.0)
    with pytest.raises(MTPError, match="no parent"):
        DraftTree(((1, 0),))
    with pytest.raises(MTPError, match="DraftTree.from_paths"):
        DraftTree([[0], [0, 0]])
    with pytest.raises(MTPError, match="tree rank 99: the heads rank 61 tokens"):
        generate(model, [[5, 6]], max_new_tokens=3, strategy="speculative", tree="[[99]]")
    with pytest.raises(MTPError, match="expected a transformers causal LM"):
        MTPModel(torch.nn.Linear(2, 2))
