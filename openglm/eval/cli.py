"""``openglm eval``: perplexity and zero-shot multiple choice, for one model or several side by side."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import OpenGLMError


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _read_data(args) -> tuple[dict[str, list], dict[str, list]]:
    """Documents of each ``--ppl`` file and items of each multiple-choice file, read (and checked) once."""
    from itertools import islice

    from ..data.prepare import read_documents
    from .multiple_choice import read_items

    mc_files = list(args.mc)
    if args.tasks_dir:
        if not Path(args.tasks_dir).is_dir():
            raise OpenGLMError(f"no tasks directory at {args.tasks_dir!r}")
        found = sorted(str(p) for p in Path(args.tasks_dir).glob("*_mc.jsonl*"))
        if not found:
            raise OpenGLMError(f"no *_mc.jsonl[.xz|.gz] files in {args.tasks_dir}")
        mc_files += found
    for path in [*args.ppl, *mc_files]:
        if not Path(path).is_file():
            raise OpenGLMError(f"no file at {path!r}")
    docs = {Path(p).name: list(islice(read_documents(p), args.max_docs)) for p in args.ppl}
    items = {Path(p).name: list(islice(read_items(p), args.max_items)) for p in mc_files}
    return docs, items


def _evaluate(model_name: str, docs: dict[str, list], items: dict[str, list], args) -> dict:
    import torch
    from tqdm import tqdm

    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model
    from .multiple_choice import multiple_choice
    from .perplexity import BOS, bos_ids, perplexity

    model = load_model(model_name, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    tok = load_tokenizer(args.tokenizer or model_name)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)
    out = {"model": model_name, "seq_len": seq_len, "stride": args.stride or seq_len // 2,
           "bos": BOS if bos_ids(tok) else None, "perplexity": {}, "multiple_choice": {}, "seconds": {}}
    for name, documents in docs.items():
        t0 = time.perf_counter()
        with tqdm(desc=f"ppl {name}", unit="tok", unit_scale=True, disable=args.quiet) as bar:
            stats = perplexity(model, tok, documents, seq_len=seq_len, stride=args.stride,
                               batch_size=args.batch_size, max_tokens=args.max_tokens, bar=bar)
        out["perplexity"][name] = {lang: s.as_dict() for lang, s in stats.items()}
        out["seconds"][name] = time.perf_counter() - t0
    for name, mc_items in items.items():
        t0 = time.perf_counter()
        with tqdm(desc=f"mc {name}", unit="item", total=len(mc_items), disable=args.quiet) as bar:
            out["multiple_choice"][name] = multiple_choice(model, tok, mc_items, args.batch_size, bar).as_dict()
        out["seconds"][name] = time.perf_counter() - t0
    return out


def table(results: list[dict]) -> str:
    """A markdown table, one row per set and metric, one value column per model."""
    head = "| set | metric | " + " | ".join(r["model"] for r in results) + " |"
    lines = [head, "|---|---|" + "---:|" * len(results)]

    def row(label, metric, values):
        lines.append(f"| {label} | {metric} | " + " | ".join(values) + " |")

    first = results[0]
    for name, per_lang in first["perplexity"].items():
        for lang, s in per_lang.items():
            label = f"{name} [{lang}] ({s['documents']} docs, {s['chars']} chars)"
            for metric, key, fmt in (("tokens", "tokens", "{}"), ("nll/token", "nll_per_token", "{:.4f}"),
                                     ("ppl/token", "perplexity", "{:.2f}"), ("bits/char", "bits_per_char", "{:.4f}")):
                row(label, metric, [fmt.format(r["perplexity"][name][lang][key]) for r in results])
    for name, m in first["multiple_choice"].items():
        for metric in ("acc", "acc_norm"):
            values = []
            for r in results:
                v = r["multiple_choice"][name]
                lo, hi = v[f"{metric}_ci95"]
                values.append(f"{v[metric]:.1%} [{lo:.1%}, {hi:.1%}]")
            row(f"{name} (n={m['items']})", f"{metric} [95% CI]", values)
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from ..utils import atomic_write_text, check_writable

    if not (args.ppl or args.mc or args.tasks_dir):
        raise OpenGLMError("nothing to evaluate: give --ppl FILE, --mc FILE or --tasks-dir DIR")
    # Output problems show before the models run, not after.
    for out in (args.json, args.plot):
        if out:
            check_writable(out, directory=False)
    if args.plot:
        from .report import require_matplotlib

        require_matplotlib()
    docs, items = _read_data(args)
    results = [_evaluate(name, docs, items, args) for name in [args.model, *args.compare]]
    print(table(results))
    if args.compare:
        from .report import relative_table

        print("\nChange versus " + args.model + ":\n\n" + relative_table(results))
    if docs:
        first_token = ("each document starts from <|endoftext|>, so its first token is predicted too"
                       if all(r["bos"] for r in results) else
                       "the first token of each document is not predicted when the tokenizer has no <|endoftext|>")
        print(f"\nPerplexity: documents scored separately in windows of {results[0]['seq_len']} tokens; {first_token}; "
              "bits/char = total NLL in bits / characters of the documents.")
    if args.json:
        atomic_write_text(args.json, json.dumps(results if args.compare else results[0], indent=2) + "\n")
    if args.plot:
        from .report import plot_compare

        print(f"plot: {plot_compare(results, args.plot)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="perplexity and zero-shot multiple-choice accuracy",
        description="Evaluate MODEL (a checkpoint directory or bundled name): perplexity per token and bits per "
                    "character, per language, on text files (.txt or JSONL with \"text\" and \"lang\", optionally "
                    ".xz/.gz); zero-shot log-likelihood accuracy on multiple-choice JSONL sets "
                    '({"context", "choices", "label"}). Prints a markdown table.')
    p.add_argument("model", help="checkpoint directory or bundled name")
    p.add_argument("--ppl", nargs="+", default=[], metavar="FILE", help="text/JSONL files (.xz/.gz) for perplexity")
    p.add_argument("--mc", nargs="+", default=[], metavar="FILE", help="multiple-choice JSONL files (.xz/.gz)")
    p.add_argument("--tasks-dir", default=None, metavar="DIR", help="also every *_mc.jsonl[.xz|.gz] file in DIR")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL",
                   help="more models evaluated on the same data, shown side by side")
    p.add_argument("--max-docs", type=_positive, default=None, metavar="N", help="first N documents of each --ppl file")
    p.add_argument("--max-tokens", type=_positive, default=None, metavar="N",
                   help="stop each --ppl file after the document that reaches N predicted tokens")
    p.add_argument("--max-items", type=_positive, default=None, metavar="N", help="first N items of each multiple-choice set")
    p.add_argument("--seq-len", type=_positive, default=512, metavar="N",
                   help="perplexity window in tokens (capped at the model's context; default 512)")
    p.add_argument("--stride", type=_positive, default=None, metavar="N",
                   help="tokens a window advances by in long documents, so each token keeps at least "
                        "seq-len - stride tokens of context (default seq-len / 2)")
    p.add_argument("--batch-size", type=_positive, default=8, metavar="N", help="sequences per forward pass (default 8)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or directory (default: the model's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights dtype (default: as recorded in the checkpoint)")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write all figures as JSON (a list of per-model objects with --compare)")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="save a figure (.png/.svg/.pdf) of perplexity change versus MODEL and accuracy per model "
                        "(needs matplotlib, the `eval` extra)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
