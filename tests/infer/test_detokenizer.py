"""The incremental detokenizer: same text as one decode of the whole row, UTF-8 held back whole, stop strings, O(1) decoding per token."""

from __future__ import annotations

from openglm.infer.generate import _Detokenizer

TEXT = "GLM 通用语言模型 reads 😀 and «quotes», then ends."


class Recording:
    """A real tokenizer that records the length of every id list it decodes."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def decode(self, ids):
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids)


def run(detok, ids):
    pieces, stopped = [], False
    for t in ids:
        text, stopped = detok.push(t)
        pieces.append(text)
        if stopped:
            break
    if not stopped:
        pieces.append(detok.flush())
    return pieces, stopped


def test_pieces_add_up_to_the_whole_decode_and_never_split_a_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces, stopped = run(_Detokenizer(tokenizer, []), ids)
    assert not stopped
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters span several byte tokens here
    assert sum(1 for p in pieces if p) > 5


def test_decoding_cost_per_token_does_not_grow_with_the_row(tokenizer):
    ids = tokenizer.encode(TEXT * 8)
    recorder = Recording(tokenizer)
    pieces, _ = run(_Detokenizer(recorder, []), ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert len(ids) > 100 and max(recorder.lengths) <= _Detokenizer.CONTEXT + 4


def test_stop_string_cuts_at_its_first_occurrence_across_tokens(tokenizer):
    ids = tokenizer.encode(TEXT)
    pieces, stopped = run(_Detokenizer(tokenizer, ["ends", "语言模"]), ids)
    assert stopped
    assert "".join(pieces) == "GLM 通用"


def test_possible_stop_start_is_held_back_then_released(tokenizer):
    ids = tokenizer.encode("GLM reads")
    detok = _Detokenizer(tokenizer, ["ads!"])
    pieces = [detok.push(t)[0] for t in ids]
    assert "".join(pieces) == "GLM re"  # "ads" may still become the stop string
    assert detok.flush() == "ads"
