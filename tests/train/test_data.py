import numpy as np
import pytest

from openglm.data.objective import IGNORE_INDEX, SpecialIds, reconstruct
from openglm.data.shards import TokenShards
from openglm.data.tokenizer import load_tokenizer
from openglm.errors import OpenGLMError
from openglm.train.data import PackedBatches, parse_objective, sentence_end_ids


@pytest.fixture(scope="module")
def shards(data_dir):
    return TokenShards(data_dir, "train")


@pytest.fixture(scope="module")
def tok(shards):
    return load_tokenizer(shards.tokenizer_dir)


def loader(shards, tok, seed=0, seq_len=64, objective="token=0.5,sentence=0.3,document=0.2"):
    return PackedBatches(shards, seq_len, SpecialIds.from_tokenizer(tok), seed=seed,
                         weights=parse_objective(objective), sentence_end_ids=sentence_end_ids(tok))


def test_parse_objective():
    assert parse_objective("token=0.5, document=0.5") == {"token": 0.5, "sentence": 0.0, "document": 0.5, "causal": 0.0}
    for bad in ("token", "tokens=1", "token=x", "token=0,causal=0", "token=-1,causal=2"):
        with pytest.raises(OpenGLMError):
            parse_objective(bad)


def test_sentence_end_ids_are_single_tokens(tok):
    ids = sentence_end_ids(tok)
    assert tok.encode(".")[0] in ids and tok.encode("\n")[0] in ids
    assert all(len(tok.decode([i])) == 1 for i in ids)


def test_rows_hold_every_document_once_in_shuffled_order(shards, tok):
    # Causal LM leaves the text as it is, so the rows laid end to end are the documents (+ EOS) in
    # the order of the seeded shuffle: nothing lost, nothing repeated, padding only at row ends.
    stream = loader(shards, tok, seed=3, objective="causal=1")
    tokens = []
    while stream.epoch == 0:
        row = stream.next_row()
        # Padding is the last segment, with no targets (a causal sample always has some).
        last = row.segment_ids == row.segment_ids.max()
        real = ~last if (row.targets[last] == IGNORE_INDEX).all() else np.ones_like(last)
        tokens.extend(row.input_ids[real].tolist())
    expected = [t for doc in shards.iter_documents(3) for t in [*doc.tolist(), tok.eos_id]]
    # The row that crossed into epoch 1 may hold the first sample of the next epoch.
    assert tokens[: len(expected)] == expected
    assert len(tokens) - len(expected) < 64


def test_glm_rows_fit_and_reconstruct_chunks(shards, tok):
    stream = loader(shards, tok, seed=1)
    for _ in range(20):
        row = stream.next_row()
        assert len(row.input_ids) == 64
        assert (row.targets != IGNORE_INDEX).any()
    # A sample's text comes back whole from its Part A and Part B.
    doc = np.append(shards.iter_documents(1).__next__(), tok.eos_id)
    first = loader(shards, tok, seed=1)
    first._refill()
    rebuilt = np.concatenate([reconstruct(s) for s in first.queue])
    assert rebuilt.tolist() == doc.tolist()


def test_state_restores_the_stream_exactly(shards, tok):
    a = loader(shards, tok, seed=5)
    for _ in range(7):
        a.next_row()
    state = a.state_dict()
    expected = [a.next_row() for _ in range(30)]  # crosses an epoch boundary
    b = loader(shards, tok, seed=5)
    b.load_state_dict(state)
    for want, got in zip(expected, (b.next_row() for _ in range(30))):
        assert np.array_equal(want.input_ids, got.input_ids)
        assert np.array_equal(want.position_ids, got.position_ids)
        assert np.array_equal(want.targets, got.targets)
        assert np.array_equal(want.prefix_end, got.prefix_end)


def test_ranks_split_the_global_batch(shards, tok):
    whole, n = loader(shards, tok, seed=2).next_batch(4)
    parts = [loader(shards, tok, seed=2).next_batch(4, rank, 2) for rank in range(2)]
    assert [p[1] for p in parts] == [n, n]  # every rank knows the global target count
    assert n == int((whole["targets"] != IGNORE_INDEX).sum())
    for rank, (part, _) in enumerate(parts):
        for key in ("input_ids", "position_ids", "targets", "attention_mask"):
            assert part[key].equal(whole[key][rank::2])
