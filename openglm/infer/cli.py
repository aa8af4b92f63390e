"""``openglm generate`` and ``openglm infill``."""

from __future__ import annotations

import sys


def _sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (per blank for infill)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--tokenizer", default=None, help="tokenizer path or name (default: the model's)")
    p.add_argument("--device", default="cpu")


def _params(args, stop_strings=()):
    from .sampling import SamplingParams

    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop_strings=list(stop_strings))


def _load(args):
    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model

    model = load_model(args.model, device=args.device)
    return model, load_tokenizer(args.tokenizer or args.model)


def _text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def cmd_generate(args) -> int:
    from .generate import stream

    params = _params(args, args.stop)
    prompt = _text(args.prompt)
    model, tok = _load(args)
    if not args.no_echo:
        sys.stdout.write(prompt)
    for piece in stream(model, prompt, tokenizer=tok, params=params, compile=args.compile):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_infill(args) -> int:
    from .generate import infill

    params = _params(args)
    model, tok = _load(args)
    print(infill(model, _text(args.text), tokenizer=tok, params=params))
    return 0


def register(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue PROMPT with MODEL (a checkpoint directory or bundled name), streaming.")
    p.add_argument("model", help="checkpoint directory or bundled name, e.g. glm-tiny")
    p.add_argument("prompt", help="the prompt text ('-' reads standard input)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster tokens after a slow first compile")
    _sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("infill", help="fill [MASK]/[sMASK]/[gMASK] blanks in text (GLM blank infilling)",
                       description="Fill each [MASK] (short span), [sMASK] (sentence) or [gMASK] (to the end) in TEXT.")
    p.add_argument("model", help="checkpoint directory or bundled name")
    p.add_argument("text", help="text with blanks ('-' reads standard input)")
    _sampling_args(p)
    p.set_defaults(func=cmd_infill, max_new_tokens=32)
