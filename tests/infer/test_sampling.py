"""The sampler draws from the filtered distribution: frequencies match it, excluded tokens never appear."""

import torch

from openglm.infer.sampling import SamplingParams, sample, sample_each


def test_frequencies_follow_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    logits = probs.log().expand(20000, 5).clone()
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(sample(logits, SamplingParams(temperature=1.0), g), minlength=5).float()
    freq = counts / counts.sum()
    assert counts[1] == 0 and counts[4] == 0  # zero probability: never drawn, also not the last token
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_top_k_and_top_p_exclude_tokens_and_seed_repeats():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).expand(5000, 5).clone()
    for params, allowed in ((SamplingParams(top_k=2), {0, 1}), (SamplingParams(top_p=0.5), {0})):
        drawn = sample(logits, params, torch.Generator().manual_seed(1))
        assert set(drawn.tolist()) == allowed
    a = sample(logits[:50], SamplingParams(), torch.Generator().manual_seed(7))
    b = sample(logits[:50], SamplingParams(), torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1


def test_sample_each_draws_every_row_as_sample_alone_would():
    torch.manual_seed(0)
    logits = torch.randn(7, 300) * 3
    params = [SamplingParams(temperature=0.8, seed=1), SamplingParams(temperature=0), SamplingParams(temperature=0.8),
              SamplingParams(temperature=1.3, top_p=0.9), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(temperature=0.8, repetition_penalty=1.5), SamplingParams(temperature=0.8, seed=2)]
    seen = [[int(logits[i].argmax()), 3] for i in range(7)]

    def generators():
        return [torch.Generator().manual_seed(100 + i) for i in range(7)]

    for _ in range(20):  # many draws: any mix-up of rows, settings or generators shows
        g1, g2 = generators(), generators()
        expected = [int(sample(logits[i : i + 1], p, g, torch.tensor([s]))[0]) for i, (p, g, s) in
                    enumerate(zip(params, g1, seen))]
        assert sample_each(logits, params, g2, seen) == expected
        logits = logits[torch.randperm(7)]


def test_sample_each_mixes_every_setting_in_one_batch_as_sample_alone_would():
    # Top-k and top-p on one row, each with several temperatures, beside rows with neither.
    torch.manual_seed(1)
    logits = torch.randn(6, 500) * 4
    params = [SamplingParams(temperature=0.7, top_k=8, top_p=0.6, seed=1), SamplingParams(temperature=1.1, seed=2),
              SamplingParams(temperature=0.5, top_k=500, seed=3), SamplingParams(temperature=2.0, top_p=0.3, seed=4),
              SamplingParams(temperature=0.9, top_k=1, seed=5), SamplingParams(temperature=0, top_k=3)]
    seen = [[] for _ in params]
    for _ in range(30):
        expected = [int(sample(logits[i : i + 1], p, torch.Generator().manual_seed(p.seed or 0))[0])
                    for i, p in enumerate(params)]
        got = sample_each(logits, params, [torch.Generator().manual_seed(p.seed or 0) for p in params], seen)
        assert got == expected
        logits = torch.randn(6, 500) * 4
