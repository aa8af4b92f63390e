"""``python -m openglm.train.launch``: torchrun, with the exit code of a stopped run.

It takes torchrun's own arguments (``--nproc-per-node 2 -m openglm pretrain ...``) and runs
``torch.distributed.run``. The one difference: on Ctrl-C or SIGTERM, after the workers have saved
their checkpoint and stopped, it exits 130 (143 for SIGTERM) with one line, as a single-process
``openglm pretrain`` does, where torchrun itself reports a ``SignalException`` traceback and exits 1.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as e:
        print(f"openglm: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
