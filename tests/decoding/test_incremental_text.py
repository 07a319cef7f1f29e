"""Streamed text (`mtp generate --stream`): pieces decoded as they become final add up to the whole text, however
the tokens arrive, for characters whose bytes span tokens (an emoji, CJK, accents in a byte-level BPE)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_tokenizer
from mtp.decoding.commands import IncrementalText, answer_text

TOK = tiny_tokenizer()  # byte-level BPE trained on ASCII: a character outside it is several byte tokens
TEXTS = ["Le café coûte 3€ 😀 日本語 ok", "What is 7 + 5? The answer is 12.", "ééé😀😀 x 中文", "😀"]


def test_decoding_each_token_alone_garbles_what_the_pieces_keep():
    ids = TOK.encode(TEXTS[0])
    assert "".join(TOK.decode([i]) for i in ids) != TOK.decode(ids)  # what streaming printed before
    text = IncrementalText(TOK)
    assert "".join(text.add([i]) for i in ids) + text.rest() == TOK.decode(ids)


@settings(max_examples=60, deadline=None)
@given(which=st.sampled_from(TEXTS), cuts=st.lists(st.integers(1, 5), max_size=40))
def test_pieces_add_up_to_the_text_however_the_tokens_arrive(which, cuts):
    ids = TOK.encode(which)
    text, pieces, start = IncrementalText(TOK), [], 0
    for n in cuts:  # steps emitting n tokens (a verify step's run), then the rest
        pieces.append(text.add(ids[start:start + n]))
        start = min(start + n, len(ids))
    pieces.append(text.add(ids[start:]))
    assert all("\ufffd" not in p for p in pieces)  # no half character is ever printed
    assert "".join(pieces) + text.rest() == TOK.decode(ids)


def test_a_sequence_that_ends_inside_a_character_gives_what_is_left():
    ids = TOK.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    text = IncrementalText(TOK)
    assert text.add(ids[:2]) == TOK.decode(ids[:2])  # complete so far
    assert text.add(ids[2:]) == ""  # waits for the character's last byte
    assert TOK.decode(ids[:2]) + text.rest() == TOK.decode(ids)  # which never comes: the decoder's text


def test_an_answer_after_a_prompt_that_ends_inside_a_character_keeps_its_own_text():
    """A token-id prompt may end inside a character (a completion cut by max_tokens, sent back to go on). The
    answer is decoded after the prompt's last tokens: their U+FFFDs (one a byte, with SentencePiece's byte
    fallback) merged with the answer's first bytes into one character, and the answer lost as many of its own
    characters ("is" for " is"). It is decoded after the prompt's last whole character instead: the bytes of
    the cut character read U+FFFD, and the answer's own text follows whole."""
    from conftest import tiny_sentencepiece_tokenizer

    for tok in (TOK, tiny_sentencepiece_tokenizer()):
        ids = tok.encode("The answer 😀 is", add_special_tokens=False)
        inside = [i for i in range(len(ids)) if tok.decode(ids[:i + 1]).endswith("\ufffd")]
        assert inside  # (the emoji is several byte tokens)
        for cut in inside:
            text = IncrementalText(tok, ids[:cut + 1])
            answer = "".join(text.add([t]) for t in ids[cut + 1:]) + text.rest()
            assert answer == answer_text(tok, ids[cut + 1:], ids[:cut + 1])
            assert answer.endswith(" is") and set(answer[:-3]) == {"\ufffd"}, (cut, answer)
