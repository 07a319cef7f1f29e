"""`mtp chat`: turns read from stdin, the conversation through the chat template, answers streamed and kept in
the conversation, /reset and /quit, Ctrl-C stopping one answer."""

from __future__ import annotations

import io
import json

import pytest
import torch

from mtp.decoding import chat as chat_module
from mtp.decoding.generate import GenerationResult, GenerationStats, generate
from mtp.models.loading import load_mtp_model
from test_cli import run_cli


def _chat(folder, typed: str, capsys, monkeypatch, *extra):
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    return run_cli(["chat", "--model", str(folder), "--max-new-tokens", "8", *extra], capsys)


def _spy(monkeypatch, caches: list | None = None) -> list[list[int]]:
    """The prompt ids of every answer the chat asks for (and its prompt cache, into `caches`)."""
    prompts, real = [], chat_module.generate_tokens

    def spy(m, ids, *a, **kw):
        prompts.append(ids[0].tolist())
        if caches is not None:
            caches.append(kw["prompt_cache"])
        return real(m, ids, *a, **kw)

    monkeypatch.setattr(chat_module, "generate_tokens", spy)
    return prompts


def test_turns_make_one_conversation_until_reset(tiny_mtp_folder, capsys, monkeypatch):
    """Answers (canned here: a tiny random model writes only line ends) are printed as streamed and kept in the
    conversation the next turn's prompt is made of; /reset keeps only the system message."""
    tok = load_mtp_model(str(tiny_mtp_folder)).tokenizer
    canned = iter(["Twelve 😀", "Twenty-four.", "Hello."])
    prompts = []

    def answer(m, ids, *a, streamer, **kw):
        prompts.append(tok.decode(ids[0].tolist()))
        tokens = tok.encode(next(canned))
        for i in range(0, len(tokens), 2):  # two tokens a step: the emoji's bytes span steps
            streamer(0, tokens[i:i + 2])
        return GenerationResult([tokens], GenerationStats(new_tokens=len(tokens)), [tok.decode(tokens)])

    monkeypatch.setattr(chat_module, "generate_tokens", answer)
    code, out, err = _chat(tiny_mtp_folder, "What is 7 + 5?\n\nAnd times 2?\n/reset\nAnd times 2?\n/quit\nnever\n",
                           capsys, monkeypatch, "--system", "Be brief.")
    assert code == 0 and len(prompts) == 3  # the empty line asks nothing; nothing after /quit
    assert out == "Twelve 😀\nTwenty-four.\nHello.\n"
    first, second, third = prompts
    assert "Be brief." in first and "What is 7 + 5?" in first
    assert second.startswith(first) and "Twelve 😀" in second and second.endswith(
        tok.apply_chat_template([{"role": "user", "content": "And times 2?"}], add_generation_prompt=True,
                                tokenize=False))
    assert "What is 7 + 5?" not in third and "Twelve" not in third and "Be brief." in third
    assert "(a new conversation)" in err and err.count("[speculative]") == 3


def test_answers_are_greedys_by_default(tiny_mtp_folder, capsys, monkeypatch):
    """The answers are greedy decoding's of each turn's whole conversation; the second turn starts from the first
    turn's keys and values (the chat's prompt cache), feeding only what follows them."""
    caches: list = []
    prompts = _spy(monkeypatch, caches)
    code, out, _ = _chat(tiny_mtp_folder, "What is 7 + 5?\nAnd times 2?\n", capsys, monkeypatch)
    model = load_mtp_model(str(tiny_mtp_folder))
    answers = [generate(model, torch.tensor([p]), max_new_tokens=8).texts[0] for p in prompts]
    assert code == 0 and len(prompts) == 2 and out == "".join(a + "\n" for a in answers)
    assert caches[0] is caches[1] and caches[1].hits == 1 and caches[1].reused_tokens == len(prompts[0]) - 1


def test_ctrl_c_stops_an_answer_and_leaves_the_turn_out(tiny_mtp_folder, capsys, monkeypatch):
    prompts, real = [], chat_module.generate_tokens

    def once_interrupted(m, ids, *a, streamer, **kw):
        prompts.append(ids[0].tolist())
        if len(prompts) == 1:
            streamer(0, [5])
            raise KeyboardInterrupt
        return real(m, ids, *a, streamer=streamer, **kw)

    monkeypatch.setattr(chat_module, "generate_tokens", once_interrupted)
    code, out, err = _chat(tiny_mtp_folder, "first question\nsecond question\n", capsys, monkeypatch)
    assert code == 0 and "(stopped; this turn is left out" in err
    tok = load_mtp_model(str(tiny_mtp_folder)).tokenizer
    assert "first question" not in tok.decode(prompts[1])  # the stopped turn is not in the conversation


def test_a_tokenizer_without_a_chat_template_is_one_line(tiny_mtp_folder, capsys, monkeypatch):
    (tiny_mtp_folder / "chat_template.jinja").unlink(missing_ok=True)
    config = tiny_mtp_folder / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    code, _, err = _chat(tiny_mtp_folder, "hi\n", capsys, monkeypatch)
    assert code == 2 and "needs a tokenizer with a chat template" in err and len(err.strip().splitlines()) <= 2


@pytest.mark.parametrize("typed", ["", "/quit\n"])
def test_end_of_input_or_quit_ends_at_once(tiny_mtp_folder, capsys, monkeypatch, typed):
    prompts = _spy(monkeypatch)
    code, out, _ = _chat(tiny_mtp_folder, typed, capsys, monkeypatch)
    assert code == 0 and prompts == [] and out == ""


def test_a_template_that_refuses_the_conversation_is_one_line(tiny_mtp_folder, capsys, monkeypatch):
    """Templates raise on what they do not take (here a system message, as some models' do): one line, exit 2."""
    (tiny_mtp_folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    code, _, err = _chat(tiny_mtp_folder, "hi\n", capsys, monkeypatch, "--system", "Be brief.")
    assert code == 2 and err.strip().splitlines()[-1] == (
        "mtp: error: the model's chat template refused the conversation: System role not supported")
    code, out, _ = _chat(tiny_mtp_folder, "hi\n", capsys, monkeypatch)  # without the system message it answers
    assert code == 0 and out


def test_save_adds_the_conversation_to_a_jsonl_that_train_and_generate_read(tiny_mtp_folder, tmp_path, capsys,
                                                                            monkeypatch):
    """/save FILE appends the conversation so far as a {"messages": [...]} record (two saves: two records, the
    file rewritten whole each time); a folder in the way, or a file where a folder should be, is a line, and the
    chat goes on; before the first turn
    there is nothing to save (and nothing is created)."""
    from mtp.decoding.commands import read_prompt_records
    from mtp.training.data import load_examples

    saved = tmp_path / "chats.jsonl"
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    typed = (f"/save {tmp_path / 'early' / 'x.jsonl'}\nWhat is 7 + 5?\n/save {saved}\n/save {tmp_path / 'folder'}\n"
             f"/save {tmp_path / 'file' / 'x.jsonl'}\nAnd times 2?\n/save {saved}\n/save\n/reset\nNew topic\n")
    code, out, err = _chat(tiny_mtp_folder, typed, capsys, monkeypatch, "--system", "Be brief.")
    records = [json.loads(line) for line in saved.read_text().splitlines()]
    assert code == 0 and len(records) == 2 and "(/save FILE: add this" in err
    assert f"(not saved: /save {tmp_path / 'folder'} is a folder; give the name of a file to write)" in err
    assert f"(not saved: /save {tmp_path / 'file' / 'x.jsonl'} cannot be created: {tmp_path / 'file'} is a file" in err
    system, user, answer = records[0]["messages"]
    assert system == {"role": "system", "content": "Be brief."} and user == {"role": "user",
                                                                              "content": "What is 7 + 5?"}
    assert answer["role"] == "assistant" and out.startswith(answer["content"] + "\n")  # the answer printed
    assert records[1]["messages"][:3] == records[0]["messages"] and len(records[1]["messages"]) == 5
    assert "(saved: 1 turn added to" in err and "(saved: 2 turns added to" in err
    assert "(nothing to save yet: no turn in this conversation)" in err and not (tmp_path / "early").exists()
    assert len(read_prompt_records(str(saved))) == 2  # mtp generate --prompts answers them (up to their last user turn)
    assert len(load_examples(str(saved))) == 2  # mtp train --data learns their answers


def test_set_changes_a_setting_for_the_turns_after(tiny_mtp_folder, capsys, monkeypatch):
    """`/set NAME VALUE` changes what the next turns decode with (sampling, penalties, stop strings, the answer's
    length); a bad name or value is one line and changes nothing; `/set` alone lists the settings."""
    seen = []
    real = chat_module.generate_tokens

    def spy(m, ids, *a, **kw):
        seen.append({k: kw.get(k) for k in ("do_sample", "temperature", "repetition_penalty", "stop_strings",
                                            "max_new_tokens", "seed")})
        return real(m, ids, *a, **kw)

    monkeypatch.setattr(chat_module, "generate_tokens", spy)
    typed = ("hi\n/set temperature 0.5\n/set do_sample true\n/set seed 3\n/set repetition_penalty 1.3\n"
             "/set stop [\"ab\", \"\\n\\n\"]\n/set max_new_tokens 4\nagain\n/set top_p 2\n/set colour red\n"
             "/set do_sample maybe\n/set temperature 0\n/set\n/set stop none\n/set do_sample off\nonce more\n")
    code, _, err = _chat(tiny_mtp_folder, typed, capsys, monkeypatch)
    assert code == 0 and len(seen) == 3
    assert seen[0] == {"do_sample": False, "temperature": 1.0, "repetition_penalty": 1.0, "stop_strings": None,
                       "max_new_tokens": 8, "seed": None}
    assert seen[1] == {"do_sample": True, "temperature": 0.5, "repetition_penalty": 1.3, "stop_strings": ["ab", "\n\n"],
                       "max_new_tokens": 4, "seed": 3}
    assert seen[2] == {**seen[1], "do_sample": False, "stop_strings": []}
    assert "(temperature 0.5; greedy decoding ignores it until /set do_sample true)" in err
    for says in ("(not set: top_p must be in (0, 1], got 2.0)", "(not set: 'colour' is not a setting",
                 "(not set: do_sample is true or false, got 'maybe')",
                 "(not set: temperature must be > 0 when sampling (do_sample))", '(do_sample true, temperature 0.5,'):
        assert says in err, (says, err)


def test_a_stop_string_ends_the_printed_answer_before_it(tiny_mtp_folder, capsys, monkeypatch):
    """With `/set stop`, the streamed answer is printed up to the stop string, never the string itself, even where
    it comes in pieces over several steps (the text that could begin one waits for the next tokens)."""
    tok = load_mtp_model(str(tiny_mtp_folder)).tokenizer

    def answer(m, ids, *a, streamer, stop_strings=None, **kw):
        tokens = tok.encode("Twelve.\n\nMore")
        for t in tokens:  # a token a step
            streamer(0, [t])
        assert stop_strings == ["\n\n"]
        return GenerationResult([tokens], GenerationStats(new_tokens=len(tokens)), ["Twelve."])

    monkeypatch.setattr(chat_module, "generate_tokens", answer)
    code, out, _ = _chat(tiny_mtp_folder, "/set stop \"\\n\\n\"\nWhat is 7 + 5?\n", capsys, monkeypatch)
    assert code == 0 and out == "Twelve.\n"


def test_an_unknown_command_is_not_sent(tiny_mtp_folder, capsys, monkeypatch):
    """A mistyped command (`/qiut`) is said to be one and sent nowhere; `//` sends a message that begins with
    `/`."""
    prompts = _spy(monkeypatch)
    code, _, err = _chat(tiny_mtp_folder, "/qiut\n//etc/hosts is a file\n", capsys, monkeypatch)
    assert code == 0 and "(unknown command /qiut: /reset, /save FILE, /set NAME VALUE, /quit;" in err, err
    tok = load_mtp_model(str(tiny_mtp_folder)).tokenizer
    assert len(prompts) == 1 and "/etc/hosts is a file" in tok.decode(prompts[0]) \
        and "//etc" not in tok.decode(prompts[0])


def test_an_answer_that_other_processes_slowed_says_so_once(tiny_mtp_folder, capsys, monkeypatch):
    """Threads that waited for a core (`CoreWait`: other processes took the cores) get one note, after the first
    answer they slowed, which names --threads 1."""
    monkeypatch.setattr(chat_module.CoreWait, "fraction", lambda self: 0.4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    code, _, err = _chat(tiny_mtp_folder, "hi\nhello\n", capsys, monkeypatch)
    assert code == 0 and err.count("waited for a CPU core 40% of the time") == 1, err
    assert "--threads 1 is often several times faster" in err


def test_a_conversation_keeps_its_grown_lookup_corpus(tiny_mtp_folder, capsys, monkeypatch, tmp_path):
    """--grow-corpus --save-corpus: each turn's answer, written as the chat ends (the last rebuild, at 2 answers,
    did not hold the third)."""
    from mtp.decoding.corpus import LookupCorpus

    saved = tmp_path / "corpus.safetensors"
    code, _, err = _chat(tiny_mtp_folder, "hi\nhello there\nok\n/quit\n", capsys, monkeypatch, "--strategy",
                         "speculative", "--lookup", "2", "--grow-corpus", "--save-corpus", str(saved))
    assert code == 0 and LookupCorpus.load(saved).answers == 3 and f"written to {saved}" in err


def test_a_line_that_is_not_utf8_is_not_sent_and_the_chat_goes_on(tiny_mtp_folder, capsys, monkeypatch):
    """A typed line holding bytes of another encoding (lone surrogates, as Python decodes them) is refused with a
    line saying so; the next line is answered, as the conversation's first turn (it was a TypeError from the
    tokenizer, and the chat ended)."""
    prompts = _spy(monkeypatch)
    code, _, err = _chat(tiny_mtp_folder, "hello \udcff\nWhat is 7 + 5?\n", capsys, monkeypatch)
    assert code == 0 and "(not sent: the line: not UTF-8 text (a byte that is no character's, at character 7))" in err
    assert len(prompts) == 1 and "hello" not in _tokenizer_of(tiny_mtp_folder).decode(prompts[0])


def _tokenizer_of(folder):
    from mtp import MTPModel

    return MTPModel.from_pretrained(folder).tokenizer
