"""GSM8K prompt, extraction and scoring match lm-eval's gsm8k_cot conventions."""

import json
import math

import pytest

from mtp.errors import MTPError
from mtp.evaluation.gsm8k import (
    FEWSHOT_EXEMPLARS,
    STOP_SEQUENCES,
    build_chat_messages,
    build_prompt,
    extract_flexible,
    extract_strict,
    is_correct,
    load_gsm8k,
    mean_and_stderr,
    normalize_number,
    reference_answer,
    truncate_at_stop,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 6 trees. The answer is 6.", "6"),
        ("The answer is 1,234.", "1,234"),
        ("The answer is -5.", "-5"),
        ("The answer is 3.50.", "3.50"),
        ("The answer is 42.\nThen 7 more.", "42"),
        ("The answer is 1. Later: The answer is 2.", "1."),  # take_first; the greedy group keeps the "."
        ("The answer is $18.", None),  # the strict regex has no "$"
        ("The total is 42.", None),
        # lm-eval's pattern needs one character after the group, so at the very end it backtracks a digit.
        # Kept as lm-eval has it, so scores stay comparable; generations normally end "N.\n\n" before "Q:".
        ("The answer is 42", "4"),
        ("no numbers here", None),
    ],
)
def test_extract_strict(text: str, expected: str | None) -> None:
    assert extract_strict(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She pays $18 in total", "$18"),
        ("It costs 1,234 dollars", "1,234"),
        ("The temperature is -7 now", "-7"),
        ("That leaves 3.50", "3.50"),
        ("The answer is 42. Then add 7 more", "7"),  # the last number wins, even after the answer sentence
        ("The answer is 42.", "42."),
        ("5 apples", "5"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_flexible(text: str, expected: str | None) -> None:
    assert extract_flexible(text) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("$18", "18"),
        ("1,234", "1234"),
        ("42.", "42"),
        ("-5", "-5"),
        ("100", "100"),
        # lm-eval's regexes_to_ignore keep decimal zeros and drop one final "." only.
        ("18.00", "18.00"),
        ("3.50", "3.50"),
        ("18..", "18."),
        (" $1,000.0 ", "1000.0"),
        ("$1,000.", "1000"),
        ("x\n#### 7", "7"),  # "(?s).*#### "
    ],
)
def test_normalize_number(raw: str, expected: str) -> None:
    assert normalize_number(raw) == expected


def test_is_correct() -> None:
    assert is_correct("$1,234.", "1234")
    assert is_correct("1,234", "1,234")
    assert is_correct("42.", "42")
    assert not is_correct(None, "42")
    assert not is_correct("...", "")  # punctuation that flexible-extract can return is never right
    assert not is_correct("-5", "5")


@pytest.mark.parametrize(
    ("output", "reference", "strict", "flexible"),
    [
        ("So she has $1,000.", "1000", False, True),
        ("The answer is 42.\n\n", "42", True, True),
        ("The answer is 42", "42", False, True),  # strict backtracks to "4"
        ("It is 12 kg, so 5 bags.", "5", False, True),
        ("The answer is -3.", "-3", True, True),
        ("The answer is - 3.", "-3", False, False),
        ("nothing", "7", False, False),
        # lm-eval scores decimal zeros and a doubled final "." as wrong (exact_match on the text, not the value)
        ("The answer is 18.00.", "18", False, False),
        ("The answer is $18.00.", "18", False, False),
        ("The answer is 5.0.", "5", False, False),
        ("So 18..", "18", False, False),
        ("The answer is 1.000.", "1", False, False),
    ],
)
def test_score_as_lm_eval(output: str, reference: str, strict: bool, flexible: bool) -> None:
    """Both metrics of hand-written outputs, as lm-eval's gsm8k_cot (0.4.13) scores them."""
    assert is_correct(extract_strict(output), reference) is strict
    assert is_correct(extract_flexible(output), reference) is flexible


def test_reference_answer() -> None:
    assert reference_answer("Janet sells 9 eggs.\n#### 1,080") == "1080"
    assert reference_answer("x = <<2*3=6>>6\n#### -6") == "-6"


def test_truncate_at_stop() -> None:
    assert truncate_at_stop("The answer is 6.\n\nQ: next question") == "The answer is 6.\n\n"
    assert truncate_at_stop("The answer is 6.<|im_end|>junk Q: x") == "The answer is 6."
    assert truncate_at_stop("no stop here") == "no stop here"
    assert truncate_at_stop("a END b", ["END"]) == "a "
    assert STOP_SEQUENCES[:3] == ["Q:", "</s>", "<|im_end|>"]


def test_exemplars_are_the_gsm8k_cot_ones() -> None:
    assert len(FEWSHOT_EXEMPLARS) == 8
    assert FEWSHOT_EXEMPLARS[0]["question"].startswith("There are 15 trees in the grove.")
    answers = [extract_strict(ex["answer"] + "\n") for ex in FEWSHOT_EXEMPLARS]
    assert answers == ["6", "5", "39", "8", "9", "29", "33", "8"]


def test_build_prompt() -> None:
    prompt = build_prompt("What is 2 + 2?")
    assert prompt.count("Q: ") == 9
    assert prompt.count("The answer is") == 8
    assert prompt.startswith("Q: There are 15 trees")
    assert "\nA: There are 15 trees originally." in prompt
    assert prompt.endswith("\n\nQ: What is 2 + 2?\nA:")
    assert build_prompt("q?", shots=0) == "Q: q?\nA:"
    with pytest.raises(MTPError):
        build_prompt("q?", shots=9)


def test_build_chat_messages() -> None:
    messages = build_chat_messages("What is 2 + 2?", shots=8)
    assert len(messages) == 17
    assert [m["role"] for m in messages[:4]] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["content"].endswith("The answer is 6.")
    assert messages[-1] == {"role": "user", "content": "Q: What is 2 + 2?\nA:"}


def test_load_gsm8k_counts_and_order() -> None:
    test = load_gsm8k("test")
    assert len(test) == 1319
    assert len(load_gsm8k("train")) == 7473
    assert [item["id"] for item in test[:3]] == [0, 1, 2]
    assert test[0]["question"].startswith("Janet")
    assert test[0]["reference"] == "18"
    assert all(item["reference"].lstrip("-").isdigit() for item in test)


def test_load_gsm8k_limit() -> None:
    items = load_gsm8k("test", limit=5)
    assert len(items) == 5
    assert items == load_gsm8k("test")[:5]


def test_load_gsm8k_malformed_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "a\n#### 1"})
    path.write_text(f"{good}\n{good}\n{{not json\n", encoding="utf-8")
    with pytest.raises(MTPError, match=r"bad\.jsonl:3: "):
        load_gsm8k(path=path)
    path.write_text(f"{good}\n" + json.dumps({"question": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(MTPError, match=r"bad\.jsonl:2: .*'answer'"):
        load_gsm8k(path=path)
    with pytest.raises(MTPError, match="not found"):
        load_gsm8k(path=tmp_path / "missing.jsonl")


def test_mean_and_stderr() -> None:
    mean, stderr = mean_and_stderr([True, False, True, True])
    assert mean == 0.75
    assert math.isclose(stderr, math.sqrt((0.25**2 * 3 + 0.75**2) / 3 / 4))
    assert mean_and_stderr([1.0]) == (1.0, 0.0)
    with pytest.raises(MTPError):
        mean_and_stderr([])


def test_mtp_lm_fork_generation_arguments():
    """The self-distillation authors' lm-eval fork spells ConfAdapt `strategy=[conf_adapt, 0.9]`, k as
    `k_toks`, the mask as `mask_id`."""
    from mtp.evaluation.gen_args import fork_arguments

    extra = {"do_mtp": True, "k_toks": "8", "mask_id": "128256", "other": 1}
    assert fork_arguments("[conf_adapt, 0.8]", 0.9, None, extra) == ("confadapt", 0.8, 8, 128256)
    assert extra == {"other": 1}  # the fork's arguments are taken out, the rest left for lm-eval
    assert fork_arguments(["conf_adapt", 0.7], 0.9, None, {}) == ("confadapt", 0.7, None, None)
    assert fork_arguments("speculative", 0.9, 4, {}) == ("speculative", 0.9, 4, None)
    assert fork_arguments("conf_adapt", 0.9, None, {"do_mtp": "False"})[0] == "greedy"
