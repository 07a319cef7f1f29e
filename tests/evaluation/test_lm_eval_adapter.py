"""The lm-evaluation-harness adapter, offline on a tiny model: direct requests and a tiny local YAML task."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
from eval_helpers import make_model  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from mtp.decoding.generate import generate  # noqa: E402
from mtp.errors import MTPError  # noqa: E402
from mtp.evaluation.lm_eval_adapter import MTPLM  # noqa: E402

pytest_plugins = ["eval_fixtures"]  # fixtures: tiny_tokenizer, tiny_model_dir, gsm8k_file


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    return make_model(tiny_tokenizer)


def _gen(context, **kwargs):
    return Instance("generate_until", {}, (context, {"until": ["Q:"], "max_gen_toks": 6, **kwargs}), 0)


def test_registered():
    from lm_eval.api.registry import get_model

    assert get_model("mtp") is MTPLM


@pytest.mark.parametrize("shots", ["", "Q: What is 2 + 2?\nA: 4\n\nQ: What is 3 + 5?\nA: 8\n\n"],
                         ids=["zero-shot", "few-shot"])
def test_generate_until_matches_our_decoding(model, tiny_tokenizer, shots):
    """Batched (left padding), lossless, and with the examples the contexts start with fed once: the same text as
    one-by-one greedy decoding."""
    contexts = [shots + c for c in ["Tom has 3 apples", "A box holds 12 eggs. How many", "Q: Sara had $20\nA:"]]
    expected = []
    for c in contexts:
        ids = torch.tensor([tiny_tokenizer(c, add_special_tokens=False)["input_ids"]])
        r = generate(model, ids, max_new_tokens=6, stop_strings=["Q:", "</s>"], tokenizer=tiny_tokenizer,
                     stop_token_ids=[tiny_tokenizer.eos_token_id])
        expected.append(tiny_tokenizer.decode(r.tokens[0], skip_special_tokens=True).split("Q:")[0])
    for strategy in ("greedy", "speculative"):
        lm = MTPLM(pretrained=model, strategy=strategy, batch_size=2)
        out = lm.generate_until([_gen(c) for c in contexts], disable_tqdm=True)
        assert out == expected  # batched (left padding) and lossless: the same text as one-by-one greedy
    lm = MTPLM(pretrained=model, strategy="static", k=3, batch_size=3)
    out = lm.generate_until([_gen(c) for c in contexts], disable_tqdm=True)
    assert len(out) == 3 and all(isinstance(t, str) for t in out)
    assert lm.tokens_per_forward > 1.0  # static k=3 emits several tokens per forward


def test_loglikelihood_uses_next_token_head(model, tiny_tokenizer):
    lm = MTPLM(pretrained=model, batch_size=2)
    pairs = [("Tom has 3", " apples"), ("A box holds", " 12 eggs"), ("Q:", " The answer is 5")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, cont), (ll, greedy) in zip(pairs, got, strict=True):
        whole = tiny_tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        n_ctx = len(tiny_tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model.base(torch.tensor([whole])).logits[0].float()  # the plain HF model
        logprobs = torch.log_softmax(logits, -1)
        target = torch.tensor(whole[n_ctx:])
        lp = logprobs[n_ctx - 1:-1].gather(1, target[:, None]).sum()
        assert ll == pytest.approx(float(lp), abs=1e-4)
        assert greedy == bool((logprobs[n_ctx - 1:-1].argmax(-1) == target).all())
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Tom has 3 apples",), 0)],
                                       disable_tqdm=True)
    assert len(rolling) == 1 and rolling[0] < 0


def test_bad_strategy(model):
    with pytest.raises(MTPError, match="unknown strategy"):
        MTPLM(pretrained=model, strategy="beam")


def test_simple_evaluate_on_local_yaml_task(model, tmp_path, monkeypatch):
    # Offline: the task reads a local JSONL through datasets' packaged "json" builder, never the hub.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    datasets_config = pytest.importorskip("datasets.config")
    monkeypatch.setattr(datasets_config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", True, raising=False)
    data = tmp_path / "arith.jsonl"
    rows = [{"question": "Tom has 3 apples and buys 2 more.", "answer": "5", "choices": ["5", "6"], "label": 0},
            {"question": "A box holds 12 eggs.", "answer": "12", "choices": ["11", "12"], "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {tmp_path / 'hf'}\n"
              "test_split: test\n")
    (tmp_path / "gen.yaml").write_text(
        "task: mtp_tiny_gen\n" + common + "output_type: generate_until\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"Q:\"]\n  max_gen_toks: 4\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n", encoding="utf-8")
    (tmp_path / "mc.yaml").write_text(
        "task: mtp_tiny_mc\n" + common + "output_type: multiple_choice\n"
        "doc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n", encoding="utf-8")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = MTPLM(pretrained=model, strategy="speculative", batch_size=2)
    results = simple_evaluate(model=lm, tasks=["mtp_tiny_gen", "mtp_tiny_mc"],
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
                              bootstrap_iters=0,
                              log_samples=False)
    assert results is not None
    assert "exact_match,none" in results["results"]["mtp_tiny_gen"]
    assert 0.0 <= results["results"]["mtp_tiny_mc"]["acc,none"] <= 1.0
    assert lm.generation_stats["new_tokens"] > 0


def test_cli_default_device_falls_back_to_cpu(model):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    lm = MTPLM(pretrained=model, device="cuda")  # lm-eval's command line passes cuda by default
    assert lm.device.type == "cpu"
