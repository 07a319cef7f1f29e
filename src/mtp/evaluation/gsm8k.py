"""GSM8K prompts, answer extraction and scoring, following lm-evaluation-harness `gsm8k_cot` (version 3.0).

Keeping the prompt text, the stop strings, both extraction regexes and exact_match's normalisation identical to
lm-eval means the numbers this project reports can be set beside numbers users got from lm-eval. Pure Python: no
model here.
"""

from __future__ import annotations

import math
import re
from importlib.resources import files
from pathlib import Path
from typing import Literal

from mtp.errors import MTPError
from mtp.io import input_file, read_json_records

# The 8 chain-of-thought exemplars of Wei et al. (2022) exactly as gsm8k_cot ships them (its `fewshot_config`,
# sampler first_n), including the unusual "9 + 20 is 29" wording.
FEWSHOT_EXEMPLARS: list[dict[str, str]] = [
    {
        "question": "There are 15 trees in the grove. Grove workers will plant trees in the grove today. "
        "After they are done, there will be 21 trees. How many trees did the grove workers plant today?",
        "answer": "There are 15 trees originally. Then there were 21 trees after some more were planted. "
        "So there must have been 21 - 15 = 6. The answer is 6.",
    },
    {
        "question": "If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the "
        "parking lot?",
        "answer": "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5.",
    },
    {
        "question": "Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have "
        "left in total?",
        "answer": "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. "
        "After eating 35, they had 74 - 35 = 39. The answer is 39.",
    },
    {
        "question": "Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. "
        "How many lollipops did Jason give to Denny?",
        "answer": "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. "
        "So he gave Denny 20 - 12 = 8. The answer is 8.",
    },
    {
        "question": "Shawn has five toys. For Christmas, he got two toys each from his mom and dad. "
        "How many toys does he have now?",
        "answer": "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more "
        "toys. 5 + 4 = 9. The answer is 9.",
    },
    {
        "question": "There were nine computers in the server room. Five more computers were installed each day, "
        "from monday to thursday. How many computers are now in the server room?",
        "answer": "There were originally 9 computers. For each of 4 days, 5 more computers were added. "
        "So 5 * 4 = 20 computers were added. 9 + 20 is 29. The answer is 29.",
    },
    {
        "question": "Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. "
        "How many golf balls did he have at the end of wednesday?",
        "answer": "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. "
        "After losing 2 more, he had 35 - 2 = 33 golf balls. The answer is 33.",
    },
    {
        "question": "Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
        "answer": "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. "
        "So she has 23 - 15 dollars left. 23 - 15 is 8. The answer is 8.",
    },
]

# gsm8k_cot's `generation_kwargs.until`. Callers add the model's own end tokens (eos, <|endoftext|>, ...).
STOP_SEQUENCES: list[str] = ["Q:", "</s>", "<|im_end|>"]

# lm-eval's filters, verbatim. strict-match takes the first match; flexible-extract takes the last.
# Note the strict pattern's final "." matches any character, so for "The answer is 42" at the very end of the
# text the group backtracks to "4" (the "." eats the "2"), exactly as in lm-eval; kept for comparable scores.
_STRICT_RE = re.compile(r"The answer is (\-?[0-9\.\,]+).")
_FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def _question_turn(question: str) -> str:
    return f"Q: {question}\nA:"


def _check_shots(shots: int) -> None:
    if not 0 <= shots <= len(FEWSHOT_EXEMPLARS):
        raise MTPError(f"shots must be between 0 and {len(FEWSHOT_EXEMPLARS)}, got {shots}")


def build_prompt(question: str, shots: int = 8) -> str:
    """The gsm8k_cot prompt: `shots` exemplar turns "Q: ..\\nA: ..", separated by blank lines, then the question."""
    _check_shots(shots)
    # lm-eval joins question and target with " " (target_delimiter) and turns with "\n\n" (fewshot_delimiter).
    turns = [f"{_question_turn(ex['question'])} {ex['answer']}\n\n" for ex in FEWSHOT_EXEMPLARS[:shots]]
    return "".join(turns) + _question_turn(question)


def build_chat_messages(question: str, shots: int = 8) -> list[dict[str, str]]:
    """The same prompt as chat turns, as lm-eval's `--apply_chat_template --fewshot_as_multiturn` builds it.

    Each exemplar is a user turn "Q: ..\\nA:" and an assistant turn with its answer; the question is the last
    user turn. Pass the result to `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.
    """
    _check_shots(shots)
    messages: list[dict[str, str]] = []
    for ex in FEWSHOT_EXEMPLARS[:shots]:
        messages.append({"role": "user", "content": _question_turn(ex["question"])})
        messages.append({"role": "assistant", "content": ex["answer"]})
    messages.append({"role": "user", "content": _question_turn(question)})
    return messages


def truncate_at_stop(text: str, stops: list[str] | None = None) -> str:
    """Cut `text` at the earliest occurrence of any stop string (the stop string itself is dropped)."""
    stops = STOP_SEQUENCES if stops is None else stops
    cut = len(text)
    for stop in stops:
        if stop:
            at = text.find(stop)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


def extract_strict(text: str) -> str | None:
    """strict-match: the number of the first "The answer is N." in `text`, as matched (not normalised)."""
    match = _STRICT_RE.search(text)
    return match.group(1).strip() if match else None


def extract_flexible(text: str) -> str | None:
    """flexible-extract: the last number-like run in `text`, as matched (not normalised).

    Faithful to lm-eval, so a run of two or more of "$0-9.," counts, including bare punctuation like "..."
    (lm-eval then scores it as wrong, and so does `is_correct`).
    """
    matches = _FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    wide, narrow = matches[-1]
    return (wide or narrow).strip()


# gsm8k_cot's `metric_list` exact_match: `regexes_to_ignore`, each removed in this order, then `ignore_case`.
_IGNORE_RES = [re.compile(r) for r in (",", r"\$", r"(?s).*#### ", r"\.$")]


def normalize_number(s: str) -> str:
    """A prediction or reference as lm-eval's exact_match compares them: every "," and "$" removed, any text up to
    "#### " removed, one final "." removed, lower case (the filters already strip surrounding whitespace).

    "$1,234." -> "1234", "18." -> "18"; decimal zeros stay, as in lm-eval: "18.00" is not "18" and "18.." is
    "18.", so such answers score as wrong, as lm-eval scores them (kept for scores comparable with lm-eval's).
    """
    s = s.strip()
    for pattern in _IGNORE_RES:
        s = pattern.sub("", s)
    return s.lower()


def reference_answer(answer_field: str) -> str:
    """The gold number of a GSM8K `answer` field: the text after the last "####" (gsm8k_cot's `doc_to_target`),
    normalised."""
    return normalize_number(answer_field.split("####")[-1])


def is_correct(pred: str | None, ref: str) -> bool:
    """lm-eval's exact_match of an extracted prediction against the reference, both normalised. No prediction
    (lm-eval's "[invalid]" fallback) is wrong."""
    if pred is None:
        return False
    pred_norm = normalize_number(pred)
    return pred_norm != "" and pred_norm == normalize_number(ref)


def _default_path(split: str) -> Path:
    return Path(str(files("mtp") / "data" / "gsm8k" / f"{split}.jsonl"))


def load_gsm8k(
    split: Literal["train", "test"] = "test", path: Path | None = None, limit: int | None = None
) -> list[dict]:
    """GSM8K problems in file order: [{"id", "question", "answer", "reference"}], `id` the 0-based index.

    Reads the copy shipped with the package unless `path` is given. Blank lines are skipped; any other bad line
    raises MTPError naming the file and line.
    """
    if split not in ("train", "test"):
        raise MTPError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    path = input_file(path if path is not None else _default_path(split), "GSM8K")
    items: list[dict] = []
    for lineno, record in read_json_records(path, limit=limit):
        if not isinstance(record, dict):
            raise MTPError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                raise MTPError(f"{path}:{lineno}: missing or non-string field {key!r}")
        if "####" not in record["answer"]:
            raise MTPError(f"{path}:{lineno}: answer has no '#### <number>' line")
        items.append(
            {
                "id": len(items),
                "question": record["question"],
                "answer": record["answer"],
                "reference": reference_answer(record["answer"]),
            }
        )
    return items


def mean_and_stderr(values: list[bool | float]) -> tuple[float, float]:
    """Mean and its standard error as lm-eval reports it: sample std (n-1) / sqrt(n); 0 when n < 2."""
    n = len(values)
    if n == 0:
        # An accuracy over no samples would read as 0% in a report; refuse instead.
        raise MTPError("cannot average an empty list of results")
    xs = [float(v) for v in values]
    mean = sum(xs) / n
    if n < 2:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var / n)
