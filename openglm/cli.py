"""``openglm <verb>``: the one command-line entry point.

Each stage owns its verbs: a module listed in ``VERB_MODULES`` has ``register(subparsers)``, which
adds its sub-commands with ``set_defaults(func=...)``. ``func(args)`` returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import OpenGLMError

VERB_MODULES = [
    "openglm.infer.cli",
    "openglm.infer.chat_cli",
    "openglm.data.tokenizer_cli",
    "openglm.data.prepare",
    "openglm.model.cli",
    "openglm.train.cli",
    "openglm.train.finetune_cli",
    "openglm.eval.cli",
    "openglm.quant.cli",
    "openglm.serve.cli",
    "openglm.serve.worker",
    "openglm.serve.admin_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openglm",
        description="General Language Models: pretrain, fine-tune, quantize, serve.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OpenGLMError as e:
        print(f"openglm: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as e:  # a disk that fills up or a file that vanishes mid-run: the cause, not a traceback
        print(f"openglm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("openglm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
