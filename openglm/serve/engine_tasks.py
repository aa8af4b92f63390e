"""Work the HTTP routes run on the model between generation steps (``GenerationBackend.run_on_model``).

Each is a module-level function (the engine may run in a process of its own: it must pickle) that
takes the model first and returns (result, generated token count) for billing.
"""

from __future__ import annotations

import torch

from ..infer.sampling import SamplingParams

SCORE_ROWS = 128  # positions per output-layer product when scoring a prompt: bounds the [rows, vocab] logits


def embed(model, batch: list[list[int]]):
    """Mean of the final hidden states of each token list, L2-normalised: a float32 array ``[len(batch), C]``."""
    device = model.lm_head.weight.device
    with torch.inference_mode():
        pooled = [model.hidden_states(torch.tensor([ids], device=device))[0].float().mean(0) for ids in batch]  # (C,)
        vectors = torch.nn.functional.normalize(torch.stack(pooled), dim=-1)  # (len(batch), C)
    return vectors.cpu().numpy(), 0


def prompt_logprobs(model, batch: list[list[int]], k: int):
    """Each prompt token's logprob given the tokens before it, and the ``k`` most likely tokens at its
    position, from one forward over the prompt: per prompt a list of (token, logprob, [(token, logprob)]),
    the first token's logprob and alternatives None (nothing predicts it). Returns (that, 0 generated tokens)."""
    device = model.lm_head.weight.device
    out = []
    with torch.inference_mode():
        for ids in batch:
            h = model.hidden_states(torch.tensor([ids], device=device))[0]  # (T, C)
            targets = torch.tensor(ids[1:], device=device)  # (T-1,): what positions 0..T-2 predict
            entries = [(ids[0], None, None)]
            for start in range(0, len(ids) - 1, SCORE_ROWS):
                rows = slice(start, min(start + SCORE_ROWS, len(ids) - 1))
                logprobs = model.lm_head(h[rows]).float().log_softmax(-1)  # (R, V)
                chosen = logprobs.gather(1, targets[rows, None])[:, 0].tolist()
                top = logprobs.topk(k, dim=-1)
                alternatives = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
                entries += zip(ids[rows.start + 1 : rows.stop + 1], chosen, alternatives)
            out.append(entries)
    return out, 0


class _SpanRecorder:
    """A tokenizer that remembers the token lists ``infill`` decodes: one per blank, the generated spans."""

    def __init__(self, tokenizer):
        self._tokenizer, self.spans = tokenizer, []

    def decode(self, ids, *args, **kwargs):
        self.spans.append(list(ids))
        return self._tokenizer.decode(ids, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def infill(model, tokenizer, text: str, params: SamplingParams):
    """``openglm.infill`` of ``text``; returns ((filled text, spans), generated token count)."""
    from ..infer.generate import infill

    recorder = _SpanRecorder(tokenizer)
    filled = infill(model, text, tokenizer=recorder, params=params)
    return (filled, [tokenizer.decode(s) for s in recorder.spans]), sum(len(s) for s in recorder.spans)
