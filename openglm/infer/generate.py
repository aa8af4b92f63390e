"""Generation with a preallocated KV cache: batched prompts, streaming, and GLM blank infilling.

Prompts of different lengths are left-padded into one batch: every row then writes the cache at
the same index each step, while its own position ids count from its first real token.
"""

from __future__ import annotations

import re
import types
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..errors import OpenGLMError
from ..model.glm import use_decode_layout
from .sampling import SamplingParams, sample

MASK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")


@dataclass
class Step:
    """One generated token of one row; ``text`` is the new printable text it completes (may be '')."""

    row: int
    token: int
    text: str
    finish_reason: str | None = None  # "stop" or "length" on the row's last step


class _Detokenizer:
    """Turns a row's tokens into text deltas: holds back half-decoded UTF-8 and possible stop-string starts.

    Each token costs O(1) decoding, not O(row): only a window ``ids[start:]`` is decoded, the new
    tokens plus a few before them as context (so rules at token boundaries, like a word's leading
    space, come out as in a decode of the whole row). ``done`` characters of the window's text have
    already moved to ``pending``, the text decoded but not yet handed out.
    """

    CONTEXT = 4  # tokens of context kept at the start of the window

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer, self.stop_strings = tokenizer, [s for s in stop_strings if s]
        self.ids: list[int] = []
        self.start = 0
        self.done = 0
        self.pending = ""

    def _decode_new(self, final: bool) -> None:
        """Move the window's new text to ``pending``, all but an incomplete trailing character unless ``final``."""
        text = self.tokenizer.decode(self.ids[self.start:])
        complete = final or not text.endswith("\ufffd")
        safe = len(text) if complete else len(text.rstrip("\ufffd"))
        if safe > self.done:
            self.pending += text[self.done:safe]
            self.done = safe
        if complete and len(self.ids) - self.start > self.CONTEXT:  # slide the window, keeping context
            self.start = len(self.ids) - self.CONTEXT
            self.done = len(self.tokenizer.decode(self.ids[self.start:]))

    def push(self, token: int) -> tuple[str, bool]:
        """Add ``token``; returns (new text, whether a stop string was reached)."""
        self.ids.append(token)
        self._decode_new(final=False)
        hits = [at for s in self.stop_strings if (at := self.pending.find(s)) != -1]
        if hits:
            delta, self.pending = self.pending[:min(hits)], ""
            return delta, True
        hold = 0  # keep back a tail that may grow into a stop string
        for s in self.stop_strings:
            hold = max(hold, next((k for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                                   if self.pending.endswith(s[:k])), 0))
        cut = len(self.pending) - hold
        delta, self.pending = self.pending[:cut], self.pending[cut:]
        return delta, False

    def flush(self) -> str:
        """Whatever was held back, once the row ends without a stop string."""
        self._decode_new(final=True)
        delta, self.pending = self.pending, ""
        return delta


def _resolve(model, tokenizer):
    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model

    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        source = model
        model = load_model(source)
        model.name_or_path = str(source)
    if tokenizer is None:
        source = getattr(model, "name_or_path", None)
        if source is None:
            raise OpenGLMError("pass a tokenizer (this model was not loaded from a path or a bundled name)")
        tokenizer = load_tokenizer(source)
    elif isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__"):
        tokenizer = load_tokenizer(tokenizer)
    return model, tokenizer


def _stop_ids(model, tokenizer, params: SamplingParams) -> set[int]:
    eos = tokenizer.special_ids.get("<|endoftext|>")
    return set(params.stop_token_ids) | set(model.config.eos_token_id) | ({eos} if eos is not None else set())


def _positions(model, pos: torch.Tensor, block: torch.Tensor | None = None) -> torch.Tensor:
    """``pos [B, T]`` -> the model's position ids: ``[B, T]``, or ``[B, 2, T]`` with the span row."""
    if not model.config.position_encoding_2d:
        return pos if block is None else pos + block
    return torch.stack((pos, torch.zeros_like(pos) if block is None else block), dim=1)


def _decode_step(model, tokens: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor, cache,
                 slots: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, vocab]`` for one new token per row, ``tokens [B, 1]``, over a ``StaticKVCache``.

    ``mask [B, 1, 1, max_length]`` marks the cache slots each row may see and ``slots [1]`` the slot
    this step writes (an argument: the compiled step takes tensors it only reads off modules as
    constants); the caller advances ``cache.length``. Every step has the same shapes, so a compiled
    step is traced once and serves the whole generation.
    """
    cache.slots = slots
    return model.lm_head(model.model(tokens, position_ids, mask, cache)[:, -1])


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_decode_step(model):
    """``_decode_step`` compiled for ``model`` (one per model, each specialised per batch size).

    freezing: under inference mode the weights become constants that inductor may prepack, so the
    compiled step belongs to this model and the guards on its modules can go (they cost ~0.3 ms a
    step); cpp_wrapper: the graph's calls are made from C++, not Python (~0.3 ms a step more);
    dynamo's ``prepare_freezing`` while it traces, for models whose linear layers are all quantized:
    the weights stop being graph inputs that every call gathers from the modules (~0.09 ms a step,
    3% of a quantized step; with float weights inductor would keep a second copy of each).
    """
    if model not in _COMPILED:
        options = {"freezing": True, "cpp_wrapper": True}
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        if skip is not None:
            options["guard_filter_fn"] = skip
        # A code object of its own: dynamo keeps compiled graphs per code object, and with the
        # module guards skipped another model's graph (other weights, same shapes) would match.
        own = types.FunctionType(_decode_step.__code__.replace(co_name=f"_decode_step_{len(_COMPILED)}"),
                                 _decode_step.__globals__, argdefs=_decode_step.__defaults__)
        compiled = torch.compile(own, fullgraph=True, dynamic=False, options=options)
        if any(type(m) is torch.nn.Linear for m in model.modules()):
            _COMPILED[model] = compiled
            return compiled
        config = torch._dynamo.config

        def step(*args):
            # Set around each call (a call may trace: a new batch size), restored after: ~3 us.
            before, config.prepare_freezing = config.prepare_freezing, True
            try:
                return compiled(*args)
            finally:
                config.prepare_freezing = before

        _COMPILED[model] = step
    return _COMPILED[model]


@torch.inference_mode()
def generate_steps(model, tokenizer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                   compile: bool = False) -> Iterator[Step]:
    """Generate for a batch of token-id prompts, yielding each token as it is chosen.

    ``compile=True`` runs each decode step as one ``torch.compile``d graph over a static KV cache:
    faster once compiled, but the first call takes a while to compile (the prefill stays eager).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise OpenGLMError("every prompt needs at least one token")
    use_decode_layout(model)  # same values and state dict, faster one-row matmuls
    device = model.model.embed_tokens.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + params.max_new_tokens
    if total > model.config.max_position_embeddings:
        raise OpenGLMError(
            f"prompt ({P} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the model's "
            f"{model.config.max_position_embeddings} positions"
        )
    stop_ids = _stop_ids(model, tokenizer, params)
    pad = tokenizer.special_ids.get("<|endoftext|>", 0)
    ids = torch.full((B, P), pad, dtype=torch.long, device=device)
    keys = torch.zeros(B, total, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        keys[i, P - len(p):P] = True
    padded = not bool(keys[:, :P].all())
    pos = (keys[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seen = ids if params.repetition_penalty != 1.0 else None

    cache = model.new_cache(B, total, static=compile)
    if compile:  # the prefill writes slots 0..P-1 and sees all `total` slots, masked by `keys`
        cache.slots = torch.arange(P, device=device)
        logits = model(ids, _positions(model, pos), keys, cache, logits_to_keep=1)[:, -1]
        cache.slots = torch.zeros(1, dtype=torch.long, device=device)  # then one slot per step, set in place
        step_fn = _compiled_decode_step(model)
    else:
        logits = model(ids, _positions(model, pos), keys[:, :P] if padded else None, cache, logits_to_keep=1)[:, -1]
    next_pos = pos[:, -1:] + 1
    detoks = [_Detokenizer(tokenizer, params.stop_strings) for _ in range(B)]
    active = [True] * B
    for step in range(params.max_new_tokens):
        tokens = sample(logits, params, generator, seen)
        last = step == params.max_new_tokens - 1
        for i, t in enumerate(tokens.tolist()):
            if not active[i]:
                continue
            if t in stop_ids:
                active[i] = False
                yield Step(i, t, detoks[i].flush(), "stop")
                continue
            text, hit = detoks[i].push(t)
            if hit or last:
                active[i] = False
                text += "" if hit else detoks[i].flush()
            yield Step(i, t, text, "stop" if hit else ("length" if last else None))
        if not any(active):
            return
        keys[:, P + step] = True
        if seen is not None:
            seen = torch.cat((seen, tokens[:, None]), dim=1)
        if compile:
            cache.slots.fill_(P + step)
            logits = step_fn(model, tokens[:, None], _positions(model, next_pos), keys[:, None, None], cache, cache.slots)
            cache.length += 1
        else:
            logits = model(tokens[:, None], _positions(model, next_pos), keys[:, :P + step + 1] if padded else None,
                           cache)[:, -1]
        next_pos = next_pos + 1


def _params(params: SamplingParams | None, kwargs) -> SamplingParams:
    if params is not None and kwargs:
        raise OpenGLMError("pass either params= or sampling keyword arguments, not both")
    return params or SamplingParams(**kwargs)


def generate(model, prompt: str | Sequence[str], tokenizer=None, params: SamplingParams | None = None,
             compile: bool = False, **sampling):
    """Complete ``prompt`` (a string, or a list of strings generated as one batch).

    ``model`` is a loaded model or a checkpoint path / bundled name (then the tokenizer comes from
    the same place). Sampling keywords: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_k``,
    ``top_p``, ``repetition_penalty``, ``seed``, ``stop_token_ids``, ``stop_strings``.
    ``compile=True`` compiles the decode step (see ``generate_steps``).
    Returns the generated text (without the prompt), or a list of them.
    """
    model, tokenizer = _resolve(model, tokenizer)
    params = _params(params, sampling)
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    out = [""] * len(prompts)
    if params.max_new_tokens:
        for step in generate_steps(model, tokenizer, [tokenizer.encode(p) for p in prompts], params, compile):
            out[step.row] += step.text
    return out[0] if single else out


def stream(model, prompt: str, tokenizer=None, params: SamplingParams | None = None, compile: bool = False,
           **sampling) -> Iterator[str]:
    """Like ``generate`` for one prompt, yielding the text piece by piece as it is generated."""
    model, tokenizer = _resolve(model, tokenizer)
    params = _params(params, sampling)
    if not params.max_new_tokens:
        return
    for step in generate_steps(model, tokenizer, [tokenizer.encode(prompt)], params, compile):
        if step.text:
            yield step.text


@torch.inference_mode()
def infill(model, text: str, tokenizer=None, params: SamplingParams | None = None, **sampling) -> str:
    """Fill every ``[MASK]`` / ``[sMASK]`` / ``[gMASK]`` blank in ``text`` the way GLM does.

    The text with its blanks is Part A, read bidirectionally. Then each blank in turn is generated
    after ``<sop>`` until ``<eop>`` (Part B), its tokens placed at the blank's position plus their
    offset in the span; later spans see the earlier ones. ``max_new_tokens`` bounds each blank.
    Returns ``text`` with each blank replaced by its span.
    """
    model, tokenizer = _resolve(model, tokenizer)
    params = _params(params, sampling)
    tokenizer.check_glm_special_tokens([*MASK_TOKENS, "<sop>", "<eop>"])
    pieces = re.split("(" + "|".join(re.escape(m) for m in MASK_TOKENS) + ")", text)
    ids, blanks = [], []
    for piece in pieces:
        if piece in MASK_TOKENS:
            blanks.append(len(ids))
            ids.append(tokenizer.token_id(piece))
        elif piece:
            ids.extend(tokenizer.encode(piece))
    if not blanks:
        raise OpenGLMError("no blank to fill: put [MASK] (short span), [sMASK] (sentence) or [gMASK] (to the end) in the text")
    A = len(ids)
    total = A + len(blanks) * (params.max_new_tokens + 1)
    if total > model.config.max_position_embeddings:
        raise OpenGLMError(f"text ({A} tokens) + {len(blanks)} blanks x max_new_tokens exceeds the model's positions")
    device = model.model.embed_tokens.weight.device
    sop, eop = tokenizer.token_id("<sop>"), tokenizer.token_id("<eop>")
    stop_ids = _stop_ids(model, tokenizer, params) | {eop}
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None

    cache = model.new_cache(1, total)
    part_a = torch.tensor([ids], device=device)
    model(part_a, _positions(model, torch.arange(A, device=device)[None]),
          torch.ones(1, A, A, dtype=torch.bool, device=device), cache, logits_to_keep=1)
    seen = part_a if params.repetition_penalty != 1.0 else None
    spans = []
    for blank in blanks:
        span, token = [], sop
        while True:
            # Part B: every token of a span sits at the blank's position, offset len(span) + 1 inside it
            # (<sop> at 1). The span's last token is fed too, so later spans see the whole span.
            pos, offset = torch.tensor([[blank]], device=device), torch.tensor([[len(span) + 1]], device=device)
            logits = model(torch.tensor([[token]], device=device), _positions(model, pos, offset), None, cache)[:, -1]
            if len(span) == params.max_new_tokens:
                break
            token = int(sample(logits, params, generator, seen)[0])
            if token in stop_ids:
                break
            span.append(token)
            if seen is not None:
                seen = torch.cat((seen, torch.tensor([[token]], device=device)), dim=1)
        spans.append(tokenizer.decode(span))
    filled = iter(spans)
    return "".join(next(filled) if p in MASK_TOKENS else p for p in pieces)
