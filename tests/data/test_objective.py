import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from openglm.data.objective import (
    IGNORE_INDEX,
    SpecialIds,
    blank_infill,
    causal_lm,
    chunk_document,
    collate,
    document_infill,
    max_chunk_tokens,
    mixture,
    pack,
    place_spans,
    reconstruct,
    sample_span_lengths,
    sentence_infill,
    token_infill,
)
from openglm.errors import OpenGLMError

SP = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5, eos=6, pad=6)
DOT = 50  # a sentence-end id in these tests
X = IGNORE_INDEX


class _Vocab:
    """The one method SpecialIds.from_tokenizer needs: names to ids."""

    def __init__(self, ids):
        self.ids = ids

    def token_id(self, name):
        return self.ids[name]


def test_special_ids_from_tokenizer():
    names = ["[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "<|endoftext|>"]
    special = SpecialIds.from_tokenizer(_Vocab({name: 100 + i for i, name in enumerate(names)}))
    assert special == SpecialIds(mask=100, smask=101, gmask=102, sop=103, eop=104, eos=105, pad=105)


def test_blank_infill_hand_checked():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17]
    # spans 11,12 and 15; Part B lists the second span first
    s = blank_infill(tokens, [(1, 3), (5, 6)], SP.mask, [1, 0], SP)
    assert s.prefix_len == 7
    assert s.input_ids.tolist() == [10, 1, 13, 14, 1, 16, 17] + [4, 15] + [4, 11, 12]
    assert s.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6] + [4, 4] + [1, 1, 1]
    assert s.position_ids[1].tolist() == [0] * 7 + [1, 2] + [1, 2, 3]
    assert s.targets.tolist() == [X] * 7 + [15, 5] + [11, 12, 5]
    assert reconstruct(s).tolist() == tokens


def test_token_infill_is_lengths_then_places_then_shuffle():
    tokens = list(range(10, 50))
    got = token_infill(tokens, np.random.default_rng(7), SP)
    rng = np.random.default_rng(7)
    spans = place_spans(40, sample_span_lengths(40, rng), rng)
    want = blank_infill(tokens, spans, SP.mask, rng.permutation(len(spans)), SP)
    assert got.input_ids.tolist() == want.input_ids.tolist()
    assert got.position_ids.tolist() == want.position_ids.tolist()
    assert got.targets.tolist() == want.targets.tolist()
    again = token_infill(tokens, np.random.default_rng(7), SP)
    assert again.input_ids.tolist() == got.input_ids.tolist()


def test_token_infill_masks_at_least_the_ratio():
    tokens = list(range(10, 110))
    for seed in range(50):
        s = token_infill(tokens, np.random.default_rng(seed), SP)
        part_a = s.input_ids[: s.prefix_len]
        num_spans = int((part_a == SP.mask).sum())
        kept = len(part_a) - num_spans
        assert 100 - kept >= 15
        assert len(s) == 100 + 2 * num_spans
        assert (s.input_ids[s.prefix_len :] == SP.sop).sum() == num_spans
        assert reconstruct(s).tolist() == tokens


def test_place_spans_without_slack_is_forced():
    assert place_spans(6, [2, 3], np.random.default_rng(0)) == [(0, 2), (3, 6)]
    with pytest.raises(ValueError):
        place_spans(5, [2, 3], np.random.default_rng(0))


def test_place_spans_keeps_a_gap_and_stays_inside():
    rng = np.random.default_rng(1)
    starts = set()
    for _ in range(300):
        spans = place_spans(12, [2, 1, 3], rng)
        assert [e - s for s, e in spans] == [2, 1, 3]
        assert spans[0][0] >= 0 and spans[-1][1] <= 12
        assert all(prev[1] < nxt[0] for prev, nxt in zip(spans, spans[1:]))
        starts.add(spans[0][0])
    assert starts == {0, 1, 2, 3, 4}  # 12 - 6 - 2 = 4 spare tokens


def test_span_lengths_follow_truncated_poisson():
    rng = np.random.default_rng(0)
    lengths = []
    for _ in range(200):
        draw = sample_span_lengths(1000, rng)
        assert 150 <= sum(draw) < 150 + 39
        lengths += draw
    # zero-truncated Poisson(3): mean 3 / (1 - e^-3) = 3.157; the cut above 39 is negligible
    assert abs(np.mean(lengths) - 3 / (1 - math.exp(-3))) < 0.08
    assert min(lengths) == 1 and max(lengths) <= 39


def test_span_lengths_fit_tiny_documents():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5):
        for _ in range(20):
            lengths = sample_span_lengths(n, rng)
            assert sum(lengths) + len(lengths) - 1 <= n


def test_sentence_infill_masks_whole_sentences():
    tokens = [10, 11, DOT, 12, DOT, 13, 14, 15, DOT, 16]
    sentences = {(10, 11, DOT), (12, DOT), (13, 14, 15, DOT), (16,)}
    for seed in range(30):
        s = sentence_infill(tokens, np.random.default_rng(seed), SP, {DOT})
        part_b = s.input_ids[s.prefix_len :].tolist()
        spans = [tuple(x for x in chunk if x != SP.sop) for chunk in _split_at(part_b, SP.sop)]
        assert set(spans) <= sentences
        assert sum(map(len, spans)) >= 1.5  # 15% of 10 tokens
        assert (s.input_ids[: s.prefix_len] == SP.smask).sum() == len(spans)
        assert reconstruct(s).tolist() == tokens


def test_sentence_infill_all_sentences_hand_checked():
    # ratio 1: both sentences go; Part A is two [sMASK]s whatever the order of Part B
    s = sentence_infill([10, DOT, 11, 12], np.random.default_rng(0), SP, {DOT}, ratio=1.0)
    assert s.input_ids[:2].tolist() == [2, 2] and s.prefix_len == 2
    first_mask = [4, 10, DOT, 4, 11, 12]
    second_mask = [4, 11, 12, 4, 10, DOT]
    assert s.input_ids[2:].tolist() in (first_mask, second_mask)
    if s.input_ids[2:].tolist() == first_mask:
        assert s.position_ids.tolist() == [[0, 1, 0, 0, 0, 1, 1, 1], [0, 0, 1, 2, 3, 1, 2, 3]]
        assert s.targets.tolist() == [X, X, 10, DOT, 5, 11, 12, 5]
    else:
        assert s.position_ids.tolist() == [[0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 2, 3, 1, 2, 3]]
        assert s.targets.tolist() == [X, X, 11, 12, 5, 10, DOT, 5]


def test_document_infill_hand_checked():
    s = document_infill([10, 11, 12, 13, 14, 15, 16, 17], np.random.default_rng(0), SP, 0.5, 0.5)
    assert s.prefix_len == 5
    assert s.input_ids.tolist() == [10, 11, 12, 13, 3, 4, 14, 15, 16, 17]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]]
    assert s.targets.tolist() == [X] * 5 + [14, 15, 16, 17, 5]


def test_document_infill_tail_length_is_uniform():
    tokens = list(range(10, 20))
    tails = [len(tokens) + 1 - document_infill(tokens, np.random.default_rng(i), SP).prefix_len
             for i in range(600)]
    counts = np.bincount(tails, minlength=11)
    assert counts[:5].sum() == 0 and (counts[5:] > 60).all()  # tails 5..10, about 100 each


def test_causal_lm_hand_checked():
    s = causal_lm([10, 11, 12], SP)
    assert s.input_ids.tolist() == [10, 11, 12] and s.prefix_len == 0
    assert s.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert s.targets.tolist() == [11, 12, X]


def test_mixture_follows_weights():
    tokens = [10, 11, DOT, 12, 13, DOT, 14, 15, 16, 17]
    seen = {SP.mask: 0, SP.smask: 0, SP.gmask: 0}
    for seed in range(300):
        s = mixture(tokens, np.random.default_rng(seed), SP, sentence_end_ids={DOT})
        kind = [t for t in (SP.mask, SP.smask, SP.gmask) if t in s.input_ids[: s.prefix_len]]
        assert len(kind) == 1
        seen[kind[0]] += 1
    assert 120 < seen[SP.mask] < 180 and 60 < seen[SP.smask] < 120 and 30 < seen[SP.gmask] < 90
    s = mixture(tokens, np.random.default_rng(0), SP, {"causal": 1.0})
    assert s.prefix_len == 0 and s.input_ids.tolist() == tokens
    with pytest.raises(OpenGLMError, match="sentence_end_ids"):
        mixture(tokens, np.random.default_rng(0), SP)
    with pytest.raises(OpenGLMError, match="unknown"):
        mixture(tokens, np.random.default_rng(0), SP, {"bert": 1.0})


def test_budget_is_tight_and_respected():
    # 48 + 2 * ceil(0.15 * 48) = 64, while 49 + 2 * ceil(7.35) = 65
    assert max_chunk_tokens(64) == 48
    # one-token sentences are the worst case: 8 spans of 1 token -> 48 + 16 = 64
    s = sentence_infill([DOT] * 48, np.random.default_rng(0), SP, {DOT})
    assert len(s) == 64
    rng = np.random.default_rng(0)
    weights = {"token": 1, "sentence": 1, "document": 1, "causal": 1}
    for seq_len in (8, 16, 64, 100):
        n = max_chunk_tokens(seq_len)
        for _ in range(100):
            tokens = rng.choice([10, 11, 12, DOT], size=n)
            assert len(mixture(tokens, rng, SP, weights, sentence_end_ids={DOT})) <= seq_len


def test_chunk_document():
    doc = np.arange(100)
    chunks = chunk_document(doc, 48)
    assert [len(c) for c in chunks] == [34, 33, 33]
    assert np.concatenate(chunks).tolist() == doc.tolist()
    assert chunk_document([], 48) == []


def test_pack_and_collate_hand_checked():
    a = document_infill([10, 11], np.random.default_rng(0), SP, 0.5, 0.5)  # [10, gMASK, sop, 11]
    b = causal_lm([20, 21], SP)
    row = pack([a, b], 8, SP.pad)
    assert row.input_ids.tolist() == [10, 3, 4, 11, 20, 21, 6, 6]
    assert row.position_ids.tolist() == [[0, 1, 1, 1, 0, 1, 0, 0], [0, 0, 1, 2, 0, 0, 0, 0]]
    assert row.targets.tolist() == [X, X, 11, 5, 21, X, X, X]
    assert row.segment_ids.tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert row.prefix_end.tolist() == [2, 2, 2, 2, 4, 4, 6, 6]
    with pytest.raises(OpenGLMError, match="max_chunk_tokens"):
        pack([a, b], 5, SP.pad)

    batch = collate([row, pack([b], 8, SP.pad)])
    assert batch["input_ids"].shape == (2, 8) and batch["targets"].shape == (2, 8)
    assert batch["position_ids"].shape == (2, 2, 8) and batch["attention_mask"].shape == (2, 8, 8)
    assert batch["attention_mask"].dtype == torch.bool and batch["input_ids"].dtype == torch.int64
    assert batch["position_ids_1d"][0].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    want = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],  # 10: Part A sees Part A
        [1, 1, 0, 0, 0, 0, 0, 0],  # [gMASK]
        [1, 1, 1, 0, 0, 0, 0, 0],  # <sop>: Part A and itself
        [1, 1, 1, 1, 0, 0, 0, 0],  # 11
        [0, 0, 0, 0, 1, 0, 0, 0],  # 20: causal document, alone
        [0, 0, 0, 0, 1, 1, 0, 0],  # 21
        [0, 0, 0, 0, 0, 0, 1, 0],  # padding
        [0, 0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(batch["attention_mask"][0], want)


def _split_at(ids, sep):
    """Split a list before each ``sep``."""
    chunks = []
    for x in ids:
        if x == sep:
            chunks.append([])
        chunks[-1].append(x)
    return chunks


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.integers(100, 100_000), min_size=1, max_size=80, unique=True),
    cuts=st.lists(st.integers(1, 80), max_size=4),
    seed=st.integers(0, 2**32 - 1),
)
def test_no_target_is_visible_to_its_prediction(data, cuts, seed):
    """Original tokens are distinct, so a leak would show as a target among the visible inputs."""
    bounds = sorted({c for c in cuts if c < len(data)} | {0, len(data)})
    docs = [data[s:e] for s, e in zip(bounds, bounds[1:])]
    ends = set(data[::5])  # some tokens act as sentence ends
    rng = np.random.default_rng(seed)
    weights = {"token": 1, "sentence": 1, "document": 1, "causal": 1}
    samples = [mixture(d, rng, SP, weights, sentence_end_ids=ends) for d in docs]
    seq_len = sum(map(len, samples)) + 3
    batch = collate([pack(samples, seq_len, SP.pad)])
    mask, ids, targets = batch["attention_mask"][0], batch["input_ids"][0], batch["targets"][0]
    assert torch.equal(batch["position_ids_1d"][0], batch["position_ids"][0].sum(0))

    start = 0
    for doc, s in zip(docs, samples):
        assert reconstruct(s).tolist() == doc
        end, a_end = start + len(s), start + s.prefix_len
        for i in range(start, end):
            visible = mask[i].nonzero().flatten()
            assert visible.min() >= start and visible.max() < end  # never another document
            if i < a_end:
                assert visible.max() < a_end  # Part A never sees Part B
            else:
                assert visible.max() == i  # Part B never sees ahead
            if targets[i] != IGNORE_INDEX:
                assert targets[i] not in ids[visible]
        start = end
    assert (targets[start:] == IGNORE_INDEX).all()
