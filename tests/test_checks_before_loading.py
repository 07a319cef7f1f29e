"""A data or prompts file that cannot be used is an error before the model loads (for a 7B model that is minutes):
`mtp train --data`, `mtp eval --data` and `mtp bench --prompts` read and check their file first. Each case runs
the command line in-process with a loader that fails the test if it is reached."""

from __future__ import annotations

import pytest

from test_damaged_inputs import assert_one_line_error, run_cli


class ModelLoaded(Exception):
    pass


def _never(*args, **kwargs):
    raise ModelLoaded("the model was loaded before the data file was checked")


@pytest.fixture
def no_model_loading(monkeypatch):
    import mtp.evaluation.commands
    import mtp.training.heads
    import mtp.training.selfdistill

    monkeypatch.setattr(mtp.training.heads.HeadsMethod, "load", _never)
    monkeypatch.setattr(mtp.training.selfdistill.SelfDistillMethod, "load", _never)
    monkeypatch.setattr(mtp.evaluation.commands, "_load", _never)


def _files(tmp_path):
    files = {"empty.jsonl": "", "empty.txt": "\n\n", "bad.jsonl": '{"question": "q", "answer": "a #### 1"}\nnot json\n',
             "keys.jsonl": '{"q": "x", "a": "y"}\n', "text.txt": "Some plain text.\n\nAnother document.\n",
             "nohash.jsonl": '{"question": "q?", "answer": "no final line"}\n',
             "noprompt.jsonl": '{"other": "x"}\n', "own.jsonl": '{"prompt": "x"}\n{"prompt": "y", "max_new_tokens": 4}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("data, extra, message", [
    ("empty.jsonl", [], "empty.jsonl: no examples"),
    ("bad.jsonl", [], "bad.jsonl:2: not valid JSON"),
    ("keys.jsonl", [], "keys.jsonl:1: cannot tell the record layout from its keys"),
    ("text.txt", ["--targets", "self"], "--targets self needs prompts for the model to answer"),
])
def test_train_checks_its_data_before_loading_the_model(tmp_path, no_model_loading, data, extra, message, capsys):
    folder = _files(tmp_path)
    code, err = run_cli(["train", "--data", folder / data, "--output", tmp_path / "run", "--steps", "1",
                         "--no-progress", *extra], capsys)
    assert_one_line_error(code, err, message)


def test_train_resume_checks_its_data_before_loading_the_model(tmp_path, no_model_loading, capsys):
    import json

    folder = _files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    data = folder / "bad.jsonl"
    (run / "train_config.json").write_text(json.dumps({"args": {"data": str(data), "steps": 1}}))
    code, err = run_cli(["train", "--output", run, "--resume", "--no-progress"], capsys)
    assert_one_line_error(code, err, "bad.jsonl:2: not valid JSON")


@pytest.mark.parametrize("data, message", [
    ("empty.jsonl", "empty.jsonl: no problems"),
    ("bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ("nohash.jsonl", "nohash.jsonl:1: answer has no '#### <number>' line"),
])
def test_eval_checks_its_data_before_loading_the_model(tmp_path, no_model_loading, data, message, capsys):
    folder = _files(tmp_path)
    code, err = run_cli(["eval", "--data", folder / data, "--output", tmp_path / "ev", "--no-progress"], capsys)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("prompts, message", [
    ("empty.txt", "empty.txt: no prompts"),
    ("empty.jsonl", "empty.jsonl: no prompts"),
    ("bad.jsonl", "bad.jsonl:2: not valid JSON"),
    ("noprompt.jsonl", "noprompt.jsonl:1: expected a JSON object with a non-empty \"prompt\" or \"text\""),
    ("nohash.jsonl", "nohash.jsonl:1: answer has no '#### <number>' line"),
    ("own.jsonl", "own.jsonl:2: a record's own 'max_new_tokens' is for `mtp generate --prompts`; a bench decodes "
                  "every prompt with the same settings"),
    ("text.txt --shots 8", "--shots 8: {folder}/text.txt holds prompts of its own, not GSM8K problems"),
])
def test_bench_checks_its_prompts_before_loading_the_model(tmp_path, no_model_loading, prompts, message, capsys):
    folder = _files(tmp_path)
    prompts, *extra = prompts.split()
    code, err = run_cli(["bench", "--prompts", folder / prompts, "--output", tmp_path / "b", "--no-progress",
                         *extra], capsys)
    message = message.format(folder=folder)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--also", "missing", "--also {path}: model not found"),
    ("--also", "folder", "--also {path}: {path} is a folder but not a model"),
    ("--also", "damaged", "--also {path}: {path}/config.json: no \"model_type\""),
    ("--gguf", "fake.gguf", "--gguf {path} is not a GGUF file"),
])
def test_bench_checks_its_other_models_before_loading_the_model(tmp_path, no_model_loading, flag, value, message,
                                                                capsys):
    path = tmp_path / value
    if value == "folder":
        path.mkdir()
    elif value == "damaged":
        path.mkdir()
        (path / "config.json").write_text('{"mtp": {"num_heads": 2}}')
    elif value.endswith(".gguf"):
        path.write_text("not a gguf")
    code, err = run_cli(["bench", flag, path, "--output", tmp_path / "b", "--no-progress"], capsys)
    assert_one_line_error(code, err, message.format(path=path))
    assert not (tmp_path / "b").exists()


def test_eval_refuses_to_resume_other_settings_before_loading_the_model(tmp_path, no_model_loading, capsys):
    import json

    out = tmp_path / "ev"
    out.mkdir()
    saved = {"task": "gsm8k_cot", "model": "default", "fingerprint": "x", "strategy": "greedy", "tau": None, "k": None,
             "num_draft": None, "tree": None, "tree_size": None, "lookup": None, "shots": 8, "chat": True,
             "max_new_tokens": 4, "data": "shipped:test", "quantize": "none", "dtype": "float32"}
    (out / "eval_config.json").write_text(json.dumps(saved))
    code, err = run_cli(["eval", "--output", out, "--strategy", "speculative", "--max-new-tokens", "4",
                         "--no-progress"], capsys)
    assert_one_line_error(code, err, f"{out} holds an evaluation with other settings (strategy 'greedy' -> "
                          "'speculative'); choose another --output, or pass --no-resume")


def test_num_trunk_layers_is_checked_against_the_config_or_gguf_header(tmp_path, monkeypatch, capsys):
    """--num-trunk-layers beyond the model's layers: refused from its config.json or its GGUF header, before a
    weight loads or a GGUF converts; a fitting value and an MTP folder (its loading checks) pass the check."""
    import mtp.hub
    from conftest import tiny_base, tiny_mtp
    from gguf_helpers import write_tiny_gguf
    from mtp.hub import ModelSizes, check_model_sizes, model_sizes

    base = tiny_base()  # 3 layers, 61 tokens, 256 positions
    base.save_pretrained(tmp_path / "hf")
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", base)
    tiny_mtp().save_pretrained(tmp_path / "mtp")
    assert model_sizes(str(tmp_path / "hf")) == model_sizes(str(gguf_file)) == ModelSizes(3, 61, 256)
    assert model_sizes(str(tmp_path / "mtp")) == ModelSizes(None, 61, 256)  # (its layers: trunk and heads)
    assert model_sizes(str(tmp_path / "nothing")) == ModelSizes()
    monkeypatch.setattr(mtp.hub, "load_base_model", _never)
    for args in (["info", "--model", tmp_path / "hf"], ["convert", "--input", gguf_file, "--output", tmp_path / "o"],
                 ["train", "--model", tmp_path / "hf", "--output", tmp_path / "run"]):
        code, err = run_cli([*args, "--num-trunk-layers", "3"], capsys)
        assert_one_line_error(code, err, "--num-trunk-layers must be in [0, 2] for this 3-layer model, got 3")
    check_model_sizes(str(tmp_path / "hf"), num_trunk_layers=2)
    check_model_sizes(str(tmp_path / "mtp"), num_trunk_layers=7)  # not told here: loading checks it
    assert not (tmp_path / "o").exists() and not (tmp_path / "run").exists()


def test_flags_indexing_into_the_model_are_checked_before_it_loads(tmp_path, monkeypatch, capsys):
    """--lora-layers, --mask-token-id, --seq-len and --logit-bias's ids against the sizes a config.json or GGUF
    header gives (3 layers, 61 tokens, 256 positions), before a weight loads; values that fit go on to loading."""
    import mtp.hub
    import mtp.models.loading
    from conftest import tiny_base, tiny_mtp
    from gguf_helpers import write_tiny_gguf

    base = tiny_base()
    base.save_pretrained(tmp_path / "hf")
    gguf_file = write_tiny_gguf(tmp_path / "tiny.gguf", base)
    tiny_mtp().save_pretrained(tmp_path / "mtp")
    monkeypatch.setattr(mtp.hub, "load_base_model", _never)
    monkeypatch.setattr(mtp.models.loading, "load_mtp_model", _never)
    train = ["train", "--data", "gsm8k", "--output", tmp_path / "run", "--no-progress"]
    for model in (tmp_path / "hf", gguf_file):
        for args, says in (
            ([*train, "--method", "selfdistill", "--lora-layers", "4"],
             "--lora-layers must be in [1, 3] for this 3-layer model, got 4"),
            ([*train, "--method", "selfdistill", "--mask-token-id", "61"],
             "--mask-token-id must be in [0, 60] for this model's 61-token vocabulary, got 61"),
            ([*train, "--seq-len", "257"], "--seq-len 257 is longer than the model's context of 256 tokens; use "
                                           "--seq-len 256 or less"),
            (["bench-train", "--seq-len", "300"], "--seq-len 300 is longer than the model's context of 256 tokens"),
            (["generate", "--prompt", "hi", "--logit-bias", "5:1", "61:-100"],
             "--logit-bias: 61 is not a token id of this model (0 to 60)"),
            # (a pair starting like a negative number is the flag's value, not another flag, for argparse)
            (["generate", "--prompt", "hi", "--logit-bias", "-5:1"], "--logit-bias: -5 is not a token id of this "
                                                                     "model (0 to 60)"),
        ):
            code, err = run_cli([*args, "--model", model], capsys)
            assert_one_line_error(code, err, says)
    code, err = run_cli(["generate", "--model", tmp_path / "mtp", "--prompt", "hi", "--logit-bias", "70:1"], capsys)
    assert_one_line_error(code, err, "--logit-bias: 70 is not a token id of this model (0 to 60)")
    with pytest.raises(ModelLoaded):  # ids within the vocabulary: on to loading
        run_cli(["generate", "--model", tmp_path / "mtp", "--prompt", "hi", "--logit-bias", "60:1"], capsys)
    assert not (tmp_path / "run").exists()


def test_k_and_num_draft_are_checked_against_the_folders_heads_before_loading(tmp_path, tiny_mtp_folder,
                                                                               monkeypatch, capsys):
    """A 3-head folder reads k <= 3 heads and verifies at most k - 1 drafts; a mask-token folder up to its max_k:
    beyond that, one line before the model loads."""
    import mtp.decoding.commands
    import mtp.models.loading
    from conftest import tiny_base, tiny_tokenizer
    from mtp import MaskTokenModel

    tok = tiny_tokenizer()
    masks = tmp_path / "masks"
    MaskTokenModel.from_base(tiny_base(vocab_size=len(tok)), tokenizer=tok).save_pretrained(masks)
    monkeypatch.setattr(mtp.models.loading, "load_mtp_model", _never)
    for folder, args, says in (
        (tiny_mtp_folder, ["--strategy", "confadapt", "--k", "4"], "--k must be in [1, 3] for this 3-head model, got 4"),
        (tiny_mtp_folder, ["--strategy", "speculative", "--num-draft", "3"],
         "--num-draft must be in [0, 2] with this 3-head model, got 3"),
        (tiny_mtp_folder, ["--strategy", "speculative", "--k", "2", "--num-draft", "2"],
         "--num-draft must be in [0, 1] with --k 2, got 2"),
        (masks, ["--strategy", "static", "--k", "17"], "--k must be in [1, 16] for this mask-token model, got 17"),
        # a tree of explicit paths is as deep as the model drafts: k - 1 tokens, at most --num-draft
        (tiny_mtp_folder, ["--strategy", "speculative", "--tree", "[[0], [0, 0], [0, 0, 0]]"],
         "--tree has depth 3, but the model drafts at most 2 tokens ahead"),
        (tiny_mtp_folder, ["--strategy", "speculative", "--num-draft", "1", "--tree", "[[0], [0, 0]]"],
         "--tree has depth 2, but the model drafts at most 1 token ahead"),
        (masks, ["--strategy", "speculative", "--k", "2", "--tree", "[[0], [0, 0]]"],
         "--tree has depth 2, but the model drafts at most 1 token ahead"),
    ):
        code, err = run_cli(["generate", "--model", folder, "--prompt", "hi", *args], capsys)
        assert_one_line_error(code, err, says)
    with pytest.raises(ModelLoaded):  # within the heads: on to loading
        run_cli(["generate", "--model", tiny_mtp_folder, "--prompt", "hi", "--strategy", "speculative", "--k", "3",
                 "--num-draft", "2"], capsys)
    deep = tmp_path / "deep.json"  # a tree file too
    deep.write_text("[[0], [0, 0], [0, 0, 0]]")
    code, err = run_cli(["generate", "--model", tiny_mtp_folder, "--prompt", "hi", "--strategy", "speculative",
                         "--tree", deep], capsys)
    assert_one_line_error(code, err, "--tree has depth 3, but the model drafts at most 2 tokens ahead")
    with pytest.raises(ModelLoaded):
        run_cli(["generate", "--model", tiny_mtp_folder, "--prompt", "hi", "--strategy", "speculative", "--tree",
                 "[[0], [1], [0, 0]]"], capsys)


def test_an_unknown_mask_token_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    """--mask-token names a token of a plain model's tokenizer: one read from its tokenizer.json says whether it
    has it, before any weight loads; a token it has goes on to loading."""
    import mtp.decoding.commands
    import mtp.models.loading
    from conftest import tiny_base, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_base(vocab_size=len(tok)).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    monkeypatch.setattr(mtp.models.loading, "load_mtp_model", _never)
    code, err = run_cli(["generate", "--model", tmp_path / "hf", "--prompt", "hi", "--strategy", "confadapt",
                         "--mask-token", "<no such token>"], capsys)
    assert_one_line_error(code, err, f"the tokenizer of {tmp_path / 'hf'} has no token '<no such token>'")
    with pytest.raises(ModelLoaded):
        run_cli(["generate", "--model", tmp_path / "hf", "--prompt", "hi", "--strategy", "confadapt",
                 "--mask-token", tok.eos_token], capsys)


def test_self_distillation_masks_past_the_context_are_refused_before_loading(tmp_path, no_model_loading, capsys):
    """The last region's k-1 masks stand at positions past a row's --seq-len tokens: with the tiny model's 256
    positions, --seq-len 252 fits plain rows but not k 8's masks (positions up to 258); one line, before loading."""
    from conftest import tiny_base

    tiny_base().save_pretrained(tmp_path / "hf")
    train = ["train", "--model", tmp_path / "hf", "--data", "gsm8k", "--output", tmp_path / "run", "--method",
             "selfdistill", "--no-progress"]
    for args, says in ((["--k-min", "2", "--k-max", "8", "--seq-len", "252"],
                        "--seq-len 252 with k 8 places mask tokens at positions up to 258, past the model's context "
                        "of 256 tokens; use --seq-len 249 or less, or k 5 or less"),
                       (["--k", "300", "--seq-len", "128"], "up to 426, past the model's context of 256 tokens; use "
                                                            "k 129 or less")):
        code, err = run_cli([*train, *args], capsys)
        assert_one_line_error(code, err, says)
    with pytest.raises(ModelLoaded):  # k 5's masks fit: on to loading
        run_cli([*train, "--k", "5", "--seq-len", "252"], capsys)
