"""``openglm eval``: perplexity and zero-shot multiple choice, for one model or several side by side."""

from __future__ import annotations

import json
from pathlib import Path


def _evaluate(model_name: str, args) -> dict:
    import itertools

    from tqdm import tqdm

    from ..data.prepare import read_documents
    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model
    from .multiple_choice import multiple_choice, read_items
    from .perplexity import perplexity

    model = load_model(model_name, device=args.device)
    tok = load_tokenizer(args.tokenizer or model_name)
    out = {"model": model_name, "perplexity": {}, "multiple_choice": {}}
    for path in args.ppl:
        docs = itertools.islice(read_documents(path), args.max_docs)
        with tqdm(desc=f"ppl {Path(path).name}", unit="doc", total=args.max_docs, disable=args.quiet) as bar:
            stats = perplexity(model, tok, docs, seq_len=args.seq_len, batch_size=args.batch_size, bar=bar)
        out["perplexity"][Path(path).name] = {lang: s.as_dict() for lang, s in stats.items()}
    for path in _mc_files(args):
        items = list(itertools.islice(read_items(path), args.max_items))
        with tqdm(desc=f"mc {Path(path).name}", unit="item", total=len(items), disable=args.quiet) as bar:
            out["multiple_choice"][Path(path).name] = multiple_choice(model, tok, items, args.batch_size, bar).as_dict()
    return out


def _mc_files(args) -> list[str]:
    from ..errors import OpenGLMError

    files = list(args.mc)
    if args.tasks_dir:
        found = sorted(str(p) for p in Path(args.tasks_dir).glob("*_mc.jsonl*"))
        if not found:
            raise OpenGLMError(f"no *_mc.jsonl[.xz|.gz] files in {args.tasks_dir}")
        files += found
    return files


def _table(results: list[dict]) -> str:
    head = "| set | metric | " + " | ".join(r["model"] for r in results) + " |"
    lines = [head, "|---|---|" + "---|" * len(results)]
    first = results[0]
    for name, per_lang in first["perplexity"].items():
        for lang in per_lang:
            for metric, fmt in (("ppl/token", "{:.2f}"), ("bits/char", "{:.3f}")):
                key = "perplexity" if metric == "ppl/token" else "bits_per_char"
                vals = [fmt.format(r["perplexity"][name][lang][key]) for r in results]
                lines.append(f"| {name} [{lang}] | {metric} | " + " | ".join(vals) + " |")
    for name in first["multiple_choice"]:
        for metric in ("acc", "acc_norm"):
            vals = []
            for r in results:
                m = r["multiple_choice"][name]
                ci = f" ({m['acc_ci95'][0]:.1%}-{m['acc_ci95'][1]:.1%})" if metric == "acc" else ""
                vals.append(f"{m[metric]:.1%}{ci}")
            lines.append(f"| {name} (n={first['multiple_choice'][name]['items']}) | {metric} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from ..errors import OpenGLMError
    from ..utils import atomic_write_text

    if not args.ppl and not args.mc and not args.tasks_dir:
        raise OpenGLMError("nothing to evaluate: give --ppl FILE, --mc FILE or --tasks-dir DIR")
    results = [_evaluate(name, args) for name in [args.model, *args.compare]]
    print(_table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps(results if args.compare else results[0], indent=2) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot multiple-choice accuracy",
                       description="Evaluate MODEL: perplexity per token and bits per character (per language) on "
                                   "text files, and log-likelihood multiple choice on JSONL sets "
                                   '({"context", "choices", "label"}).')
    p.add_argument("model", help="checkpoint directory or bundled name")
    p.add_argument("--ppl", nargs="+", default=[], metavar="FILE", help="text/JSONL files (.xz/.gz) for perplexity")
    p.add_argument("--mc", nargs="+", default=[], metavar="FILE", help="multiple-choice JSONL files")
    p.add_argument("--tasks-dir", default=None, help="evaluate every *_mc.jsonl[.xz] file in this directory")
    p.add_argument("--compare", nargs="+", default=[], metavar="MODEL", help="more models, shown side by side")
    p.add_argument("--max-docs", type=int, default=None, help="perplexity on the first N documents")
    p.add_argument("--max-items", type=int, default=None, help="first N items of each multiple-choice set")
    p.add_argument("--seq-len", type=int, default=512, help="scoring window in tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokenizer", default=None, help="default: the model's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, metavar="OUT", help="write all figures as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)
