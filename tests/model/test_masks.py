import torch

from openglm.model.masks import causal_mask, packed_mask, padding_causal_mask, prefix_lm_mask


def test_prefix_lm_mask_by_hand():
    expected = torch.tensor([
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(prefix_lm_mask(3, 5), expected)
    assert torch.equal(prefix_lm_mask(0, 4), causal_mask(4))


def test_packed_documents_never_see_each_other():
    seg = torch.tensor([0, 0, 0, 1, 1, 2])
    prefix_end = torch.tensor([2, 2, 2, 3, 3, 6])  # doc 0 has a 2-token Part A; doc 1 is causal
    m = packed_mask(seg, prefix_end)
    assert m[0].tolist() == [True, True, False, False, False, False]
    assert m[2].tolist() == [True, True, True, False, False, False]
    assert m[4].tolist() == [False, False, False, True, True, False]
    assert m[5].tolist() == [False] * 5 + [True]


def test_padding_causal_mask_with_offset():
    keys = torch.tensor([[0, 1, 1, 1]])
    m = padding_causal_mask(keys, T=2, offset=2)  # queries at positions 2 and 3
    assert m.tolist() == [[[False, True, True, False], [False, True, True, True]]]
