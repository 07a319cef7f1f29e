"""Trust: no code runs from a checkpoint, and every damaged input is one line and exit code 2, before any work.

Each test damages one file of an intact tiny model folder (or plants a pickle that would run code) and runs the
command line in-process, as a user would."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_base, tiny_mtp, tiny_tokenizer
from mtp.cli import main
from mtp.errors import MTPError
from mtp.training.checkpoints import (
    LEGACY_STATE_NAME,
    STATE_NAME,
    TENSORS_NAME,
    latest_checkpoint,
    list_checkpoints,
    load_trainer_state,
)


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()  # what the fixtures printed
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_pickle(path: Path, marker: Path) -> Path:
    torch.save({"step": 3, "x": Payload(marker)}, path)
    return path


def test_the_payload_is_live(tmp_path):
    """The planted file does run code when unpickled the old way, so the refusals below mean something."""
    marker = tmp_path / "ran"
    torch.load(plant_pickle(tmp_path / "p.pt", marker), weights_only=False)
    assert marker.exists()


def test_src_never_unpickles():
    src = Path(__file__).parents[1] / "src"
    calls = [(path, line) for path in src.rglob("*.py") for line in path.read_text().splitlines()
             if "torch.load(" in line]
    assert calls, "torch.load is no longer used: update this test"
    assert all("weights_only=True" in line for _, line in calls), calls
    assert not [p for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]


# ------------------------------------------------------------------------------------------------ a tiny run
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step training run of a tiny model, with its checkpoint (what `mtp train --resume` reads)."""
    root = tmp_path_factory.mktemp("run")
    tok = tiny_tokenizer()
    base = tiny_base("llama", vocab_size=len(tok))
    base.save_pretrained(root / "hf")
    tok.save_pretrained(root / "hf")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"It is {i + 1}."}) + "\n"
                            for i in range(8)), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", str(root / "hf"), "--data", str(data), "--output", str(root / "run"),
              "--steps", "2", "--save-every", "1", "--seq-len", "32", "--batch-size", "2", "--holdout", "0",
              "--num-heads", "2", "--no-progress"])
    assert exit_info.value.code == 0
    return root


@pytest.fixture
def run_copy(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "r")
    return tmp_path / "r"


def test_trainer_state_is_json_and_safetensors(run_copy):
    ckpt = latest_checkpoint(run_copy / "run" / "checkpoints")
    assert (ckpt / STATE_NAME).is_file() and (ckpt / TENSORS_NAME).is_file()
    assert not (ckpt / LEGACY_STATE_NAME).exists()
    state = load_trainer_state(ckpt)
    assert state["step"] == 2 and isinstance(state["rng"]["python"], tuple)
    assert isinstance(next(iter(state["optimizer"]["state"])), int)  # parameter indices stay ints


def every_checkpoint(run: Path) -> list[Path]:
    return [folder for _, folder in list_checkpoints(run / "checkpoints")]


def test_an_old_pickled_trainer_state_is_refused_unread(run_copy, capsys):
    marker = run_copy / "ran"
    for ckpt in every_checkpoint(run_copy / "run"):
        (ckpt / STATE_NAME).unlink()
        (ckpt / TENSORS_NAME).unlink()
        plant_pickle(ckpt / LEGACY_STATE_NAME, marker)
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, LEGACY_STATE_NAME, "pickle")
    assert not marker.exists()


def test_a_pickle_posing_as_meta_weights_is_refused_unread(tmp_path, capsys):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 61}))
    marker = tmp_path / "ran"
    plant_pickle(folder / "consolidated.00.pth", marker)
    for args in (["info", "--model", folder], ["convert", "--input", folder, "--output", tmp_path / "out"]):
        code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, "consolidated.00.pth", "which mtp does not unpickle")
        assert "weights_only" not in err and not marker.exists()  # (torch's text suggests weights_only=False)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_trainer_state_is_one_line(run_copy, damage, capsys):
    for ckpt in every_checkpoint(run_copy / "run"):
        damage_file(ckpt / TENSORS_NAME, damage)
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, TENSORS_NAME)


def test_a_trainer_state_that_is_not_json_is_one_line(run_copy, capsys):
    for ckpt in every_checkpoint(run_copy / "run"):
        (ckpt / STATE_NAME).write_text('{"step": 2, "optim')
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, STATE_NAME, "not valid JSON")


@pytest.mark.parametrize("text, says", [
    ("[]", "train_config.json is not a training run's config (expected a JSON object)"),
    ('{"args": null}', '"args" must be an object of the run\'s flags'),
    ('{"args": {"data": 5}}', '"data" is 5, not a str as its flag\'s values are'),
    ('{"args": {"seq_len": true}}', '"seq_len" is True, not a int'),
    ('{"args": {"seq_len": 1}}', "--seq-len must be >= 2, got 1 (the file was edited or damaged)"),
])
def test_a_train_config_of_the_wrong_shape_is_one_line(run_copy, text, says, capsys):
    """Valid JSON that is no run's config (an edit, a bad copy): one line naming the file (a traceback)."""
    (run_copy / "run" / "train_config.json").write_text(text)
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, "train_config.json", says)


def test_metrics_lines_that_are_no_records_are_dropped_on_resume(run_copy, capsys):
    """A line of metrics.jsonl that is JSON but no step's record ([1], a step that is no number) is dropped, as a
    line cut off by a crash is (an AttributeError)."""
    metrics = run_copy / "run" / "metrics.jsonl"
    kept = metrics.read_text()
    metrics.write_text(kept + '[1]\n{"step": "x"}\n')
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert all(isinstance(json.loads(line), dict) for line in metrics.read_text().splitlines())


# ------------------------------------------------------------------------------------------------ model folders
def damage_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # a copy cut short
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


# (file to damage, how, what the one line must name)
DAMAGES = {
    "weights-truncated": ("model.safetensors", "truncated", "damaged safetensors"),
    "weights-garbage": ("model.safetensors", "garbage", "damaged safetensors"),
    "config-not-json": ("config.json", "truncated", "not valid JSON"),
    "tokenizer-not-json": ("tokenizer.json", "truncated", "not valid JSON"),
}


def _model_folder(tmp_path: Path, kind: str) -> Path:
    tok = tiny_tokenizer()
    folder = tmp_path / kind
    if kind == "mtp":
        model = tiny_mtp("llama", num_heads=2, vocab_size=len(tok))
        model.tokenizer = tok
        model.save_pretrained(folder)
    else:
        tiny_base("llama", vocab_size=len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["mtp", "hf"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_model_folder_is_one_line(tmp_path, kind, damage, capsys):
    folder = _model_folder(tmp_path, kind)
    name, how, message = DAMAGES[damage]
    damage_file(folder / name, how)
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(folder / name), message)


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "model_type": "no-such-architecture"}, "not a usable model config"),
    (lambda c: {k: v for k, v in c.items() if k != "model_type"}, "model_type"),
    (lambda c: {**c, "hidden_size": 33}, "hidden size"),
    (lambda c: {**c, "mtp": {"num_heads": "three"}}, "num_heads"),
])
def test_an_invalid_config_is_one_line(tmp_path, edit, message, capsys):
    folder = _model_folder(tmp_path, "mtp")
    config = folder / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(config), message)


# Sizes transformers accepts but no model of these weights has: each was a traceback while the model was built,
# after (hidden_size, vocab_size) an allocation of terabytes, or (layers, heads) minutes building modules.
ABSURD_SIZES = {
    "vocab-negative": ({"vocab_size": -5}, "vocab_size must be at least 1, got -5"),
    "kv-heads-zero": ({"num_key_value_heads": 0}, "num_key_value_heads must be at least 1, got 0"),
    "head-dim-zero": ({"head_dim": 0}, "head_dim must be at least 1, got 0"),
    "vocab-huge": ({"vocab_size": 10**10}, "the sizes do not describe these weights"),
    "hidden-huge": ({"hidden_size": 2**20, "head_dim": 2**18}, "the sizes do not describe these weights"),
    "intermediate-huge": ({"intermediate_size": 10**9}, "the sizes do not describe these weights"),
    "layers-huge": ({"num_hidden_layers": 10**6}, "the sizes do not describe these weights"),
}


@pytest.mark.parametrize("kind", ["mtp", "hf"])
@pytest.mark.parametrize("sizes", list(ABSURD_SIZES))
def test_config_sizes_that_do_not_fit_the_weights_are_one_line(tmp_path, kind, sizes, capsys):
    folder = _model_folder(tmp_path, kind)
    config = folder / "config.json"
    edit, message = ABSURD_SIZES[sizes]
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(config), message)


def test_an_mtp_section_with_absurd_heads_is_one_line(tmp_path, capsys):
    folder = _model_folder(tmp_path, "mtp")
    config = folder / "config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "mtp": {**data["mtp"], "num_heads": 10**6}}))
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(config), "1,000,000 heads", "the sizes do not describe these weights")


@pytest.mark.parametrize("version, message", [
    (2, "was written by a newer mtp (folder format 2; this one reads up to 1): install a newer mtp to read it"),
    ("1", "format_version must be a whole number of 1 or more, got '1'"),
    (0, "format_version must be a whole number of 1 or more, got 0"),
])
def test_a_folder_of_a_newer_format_is_refused(tmp_path, version, message, capsys):
    """A folder whose `mtp` section names a format this mtp does not know is refused, not misread: by the CLI
    before loading, and by the classes' from_pretrained; one without a version (written before there was one)
    loads as format 1."""
    from mtp import MaskTokenModel, MTPModel

    heads = _model_folder(tmp_path, "mtp")
    masks = tmp_path / "masks"
    MaskTokenModel.from_base(tiny_base(vocab_size=len(tiny_tokenizer())), tokenizer=tiny_tokenizer()) \
        .save_pretrained(masks)
    for folder, cls in ((heads, MTPModel), (masks, MaskTokenModel)):
        config = folder / "config.json"
        data = json.loads(config.read_text())
        assert data["mtp"]["format_version"] == 1
        config.write_text(json.dumps({**data, "mtp": {**data["mtp"], "format_version": version}}))
        code, err = run_cli(["info", "--model", folder], capsys)
        assert_one_line_error(code, err, message)
        with pytest.raises(MTPError, match=re.escape(message)):
            cls.from_pretrained(folder)
        config.write_text(json.dumps({**data, "mtp": {k: v for k, v in data["mtp"].items() if k != "format_version"}}))
        cls.from_pretrained(folder)


@pytest.mark.parametrize("edit, message", [
    ({"num_hidden_layers": 5}, "missing: model.layers.3."),  # was loaded, its layers 3 and 4 at random
    ({"tie_word_embeddings": False}, "missing: lm_head.weight"),  # was loaded, its unembedding at random
    ({"vocab_size": 400}, "mis-shaped: model.embed_tokens.weight (weights (297, 32), config (400, 32))"),  # a traceback
])
def test_weights_that_do_not_fill_the_model_are_one_line(tmp_path, edit, message, capsys):
    """A Hugging Face folder loaded by transformers (not mtp's reader: these configs are within the size bound)."""
    folder = _model_folder(tmp_path, "hf")
    config = folder / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    code, err = run_cli(["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2", "--no-progress"],
                        capsys)
    assert_one_line_error(code, err, f"{folder}: the weights do not match the model its config describes", message)


@pytest.mark.parametrize("kind", ["mtp", "hf"])
def test_missing_tokenizer_files_are_one_line(tmp_path, kind, capsys):
    folder = _model_folder(tmp_path, kind)
    (folder / "tokenizer.json").unlink()  # tokenizer_config.json stays: it needs its vocabulary
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(folder), "tokenizer files missing")


def test_missing_weights_are_one_line(tmp_path, capsys):
    folder = _model_folder(tmp_path, "hf")
    (folder / "model.safetensors").unlink()
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(folder), "no weights")


@pytest.mark.parametrize("kind", ["mtp", "hf"])
def test_a_folder_asking_to_run_its_own_code_is_refused(tmp_path, kind, capsys):
    folder = _model_folder(tmp_path, kind)
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
                                    "from transformers import LlamaConfig\n"
                                    "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, str(folder / "config.json"), "custom code")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_a_damaged_meta_checkpoint_is_one_line(tmp_path, how, capsys):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "params.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 61}))
    torch.save({"tok_embeddings.weight": torch.zeros(61, 32), "norm.weight": torch.ones(32)},
               folder / "consolidated.00.pth")
    damage_file(folder / "consolidated.00.pth", how)
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, "consolidated.00.pth")


def _commands(folder: Path, out: Path, kind: str) -> dict[str, list]:
    return {
        "info": ["info", "--model", folder],
        "generate": ["generate", "--model", folder, "--prompt", "hi", "--max-new-tokens", "2"],
        "eval": ["eval", "gsm8k", "--model", folder, "--limit", "1", "--output", out / "eval"],
        "bench": ["bench", "--model", folder, "--limit", "1", "--max-new-tokens", "2", "--output", out / "bench",
                  "--no-progress"],
        "convert": ["convert", "--input", folder, "--output", out / "converted"] + (["--to", "meta"] if kind == "mtp"
                                                                                     else []),
        "train": ["train", "--model", folder, "--data", "gsm8k", "--limit", "4", "--steps", "1", "--seq-len", "64",
                  "--output", out / "train", "--no-progress"],
    }


@pytest.mark.parametrize("command", ["info", "generate", "eval", "bench", "convert", "train"])
@pytest.mark.parametrize("kind", ["mtp", "hf"])
def test_every_command_that_loads_a_model_checks_it(tmp_path, kind, command, capsys):
    folder = _model_folder(tmp_path, kind)
    damage_file(folder / "model.safetensors", "truncated")
    code, err = run_cli(_commands(folder, tmp_path, kind)[command], capsys)
    assert_one_line_error(code, err, str(folder / "model.safetensors"), "damaged safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name not in (kind,)], "work was done before the check"


def test_resume_checks_the_checkpoint_weights(run_copy, capsys):
    """A damaged newest checkpoint is named and passed over: --resume goes on from the one before it (it refused
    the run, telling the user to "copy or save it again"). Every checkpoint damaged: one line, the newest's."""
    first, newest = every_checkpoint(run_copy / "run")
    damage_file(newest / "model.safetensors", "truncated")
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert f"mtp: {newest} cannot be read" in err and f"going on from {first.name}" in err
    metrics = [json.loads(line) for line in (run_copy / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval" not in m] == [1, 2]  # step 2 trained again, once
    for ckpt in every_checkpoint(run_copy / "run"):
        damage_file(ckpt / "model.safetensors", "truncated")
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, "no checkpoint in", str(newest / "model.safetensors"), "damaged safetensors")


def test_a_newest_checkpoint_without_its_weights_is_passed_over(run_copy, capsys):
    """A checkpoint that lost its model.safetensors (its trainer_state.safetensors passed for the weights): named
    and passed over, as a damaged one is (--resume refused the run)."""
    first, newest = every_checkpoint(run_copy / "run")
    (newest / "model.safetensors").unlink()
    code, err = run_cli(["train", "--output", run_copy / "run", "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert f"mtp: {newest} cannot be read ({newest}: no weights (expected model.safetensors))" in err
    assert f"going on from {first.name}" in err


def test_pruning_after_a_damaged_newer_checkpoint_keeps_the_good_ones(tmp_path):
    """--resume passed over a damaged step-135 and went on from step 100; saving step 126 (--keep-checkpoints 2)
    removed step 100 and kept the damaged one: the newest intact checkpoint after it was gone."""
    from mtp.training.checkpoints import STATE_NAME, checkpoint_dir, list_checkpoints, prune_checkpoints

    for step in (60, 100, 126, 135):
        folder = checkpoint_dir(tmp_path, step)
        folder.mkdir()
        (folder / STATE_NAME).write_text("{}")
        (folder / "config.json").write_text("{}")
    prune_checkpoints(tmp_path, 126, keep=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [100, 126, 135]


def test_the_python_api_raises_mtperror_too(tmp_path):
    from mtp.models.loading import load_mtp_model

    folder = _model_folder(tmp_path, "mtp")
    damage_file(folder / "model.safetensors", "garbage")
    with pytest.raises(MTPError, match="damaged safetensors"):
        load_mtp_model(str(folder))


# ------------------------------------------------------------------------------------------------ data files
@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_json_named_file_that_is_not_json_names_the_line(tmp_path, suffix, capsys):
    folder = _model_folder(tmp_path, "mtp")
    bad = tmp_path / f"bad{suffix}"
    bad.write_text('{"prompt": "ok", "question": "q", "answer": "a #### 1"}\n\nthis line is prose\n')
    for args in (["generate", "--model", folder, "--prompts", bad],
                 ["train", "--model", folder, "--data", bad, "--output", tmp_path / "t", "--seq-len", "64",
                  "--no-progress"],
                 ["bench", "--model", folder, "--prompts", bad, "--output", tmp_path / "b", "--no-progress"]):
        code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, f"{bad}:3: not valid JSON")


# JSON that parses into what no reader takes, or that Python's parser refuses with errors other than a
# JSONDecodeError: each was a traceback (a ValueError, a RecursionError, the tokenizer's TypeError).
UNREADABLE_JSON = {
    "long-integer": ('{"prompt": "ok", "id": ' + "9" * 5000 + "}", "not valid JSON (Exceeds the limit"),
    "nested": ('{"prompt": "ok", "id": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON (it nests too deep)"),
    "lone-surrogate": ('{"prompt": "half \\ud83d of an emoji", "completion": "a"}', "holds a lone surrogate"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("content", list(UNREADABLE_JSON))
def test_json_no_reader_takes_names_the_line(tmp_path, suffix, content, capsys):
    folder = _model_folder(tmp_path, "mtp")
    record, message = UNREADABLE_JSON[content]
    bad = tmp_path / f"bad{suffix}"
    good = '{"prompt": "fine", "completion": "b"}'
    bad.write_text(f"[{good},\n{record}]\n" if suffix == ".json" else f"{good}\n{record}\n")
    for args in (["generate", "--model", folder, "--prompts", bad],
                 ["train", "--model", folder, "--data", bad, "--output", tmp_path / "t", "--seq-len", "64",
                  "--no-progress"]):
        code, err = run_cli(args, capsys)
        assert_one_line_error(code, err, f"{bad}:2: {message}")


def test_a_config_nested_too_deep_is_one_line(tmp_path, capsys):
    folder = _model_folder(tmp_path, "hf")
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, err = run_cli(["info", "--model", folder], capsys)
    assert_one_line_error(code, err, f"{folder / 'config.json'} is not valid JSON: it nests too deep")
