"""OpenGLM: General Language Models in plain PyTorch.

Public API::

    import openglm
    model = openglm.load_model("glm-tiny")            # a checkpoint directory or a bundled name
    tok = openglm.load_tokenizer("glm-tiny")
    openglm.generate(model, "The capital of France is", tokenizer=tok, max_new_tokens=20)
    openglm.infill(model, "GLM fills [MASK] in text.", tokenizer=tok)
    openglm.Config.from_name("glm-4-9b")
"""

from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# Imported on first use, so that `openglm --help` and light imports do not pay for torch.
_EXPORTS = {
    "Config": "openglm.config",
    "OpenGLMError": "openglm.errors",
    "load_model": "openglm.model.checkpoint",
    "save_model": "openglm.model.checkpoint",
    "GLMForCausalLM": "openglm.model.glm",
    "KVCache": "openglm.model.kv_cache",
    "load_tokenizer": "openglm.data.tokenizer",
    "Tokenizer": "openglm.data.tokenizer",
    "generate": "openglm.infer.generate",
    "stream": "openglm.infer.generate",
    "infill": "openglm.infer.generate",
    "SamplingParams": "openglm.infer.sampling",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'openglm' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
