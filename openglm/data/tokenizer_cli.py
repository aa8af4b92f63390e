"""``openglm tokenizer train|encode``: train the bilingual BPE tokenizer, inspect how text tokenizes."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("tokenizer", help="train or try a tokenizer")
    verbs = parser.add_subparsers(dest="tokenizer_verb", metavar="<action>", required=True)

    train = verbs.add_parser(
        "train",
        help="train a byte-level BPE tokenizer with the GLM special tokens",
        description="Train a byte-level BPE tokenizer on .txt (a text a line) or .jsonl (a \"text\" field "
        "a line) files, optionally .gz/.xz compressed; writes tokenizer.json and tokenizer_config.json.",
    )
    train.add_argument("--input", nargs="+", required=True, metavar="FILE", help="training text files")
    train.add_argument("--vocab-size", type=int, required=True, help="vocabulary size, special tokens included")
    train.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (default 2)")
    train.add_argument("--max-chars", type=int, default=None, help="read at most this many characters")
    train.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="directory to write into")
    train.set_defaults(func=_train)

    encode = verbs.add_parser("encode", help="print the ids and pieces of a text")
    encode.add_argument("text", help="text to encode")
    encode.add_argument(
        "--tokenizer", default="glm-tiny", help="tokenizer.json, a directory or a bundled name (default glm-tiny)"
    )
    encode.add_argument(
        "--allow-special", action="store_true", help="let strings like <|user|> become special tokens"
    )
    encode.set_defaults(func=_encode)


def _train(args: argparse.Namespace) -> int:
    from ..utils import check_writable
    from .tokenizer import read_texts, train_tokenizer

    check_writable(args.output)
    texts = read_texts(args.input, max_chars=args.max_chars, progress=True)
    tok = train_tokenizer(texts, args.vocab_size, min_frequency=args.min_frequency, show_progress=True)
    path = tok.save(args.output)
    print(f"vocab size {tok.vocab_size}: wrote {path}")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(args.text, allow_special=args.allow_special)
    print(f"{len(ids)} tokens: {ids}")
    for i in ids:
        # The token string is in byte-level form (e.g. "Ġ" for a space); the decoded piece is readable.
        print(f"{i:>8}  {tok.id_to_token(i)!r:<24} {tok.decode([i])!r}")
    return 0
