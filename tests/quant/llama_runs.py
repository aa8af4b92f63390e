"""Run a GGUF export in llama.cpp (llama-cpp-python) beside openglm on the same tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openglm import load_model
from openglm.quant.gguf import export_gguf

TEXT = "The General Language Model fills blanks in text."


def assert_llama_cpp_runs_like_openglm(checkpoint, tokenizer, tmp_path):
    """Export ``checkpoint`` as f32 GGUF, score the same 10 tokens in llama.cpp and in openglm: the same
    greedy tokens and logits within 1% of their range. Returns the llama.cpp model (skips without it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = export_gguf(checkpoint, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    ids = tokenizer.encode(TEXT)[:10]
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = load_model(checkpoint)(torch.tensor([ids]))[0].numpy()
    assert (theirs.argmax(-1) == ours.argmax(-1)).all()  # the same greedy tokens
    assert np.allclose(theirs, ours, atol=1e-2 * np.abs(ours).max())
    return llm
