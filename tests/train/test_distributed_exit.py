"""Under torchrun, training ends its process groups itself: no gloo thread is left running into interpreter exit.

Threads left running there abort the process at exit now and then ("terminate called without an active
exception", SIGABRT) when one of them needs the interpreter lock while the interpreter is torn down.
"""

import os
import socket
import subprocess
import sys

import pytest

# Runs `openglm ARGS...` in a torchrun worker, then names the gloo threads still alive.
WORKER = """
import os, sys
from openglm.cli import main
code = main(sys.argv[1:])
names = {open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")}
left = sorted(n for n in names if "gloo" in n)
print(f"rank {os.environ['RANK']} gloo threads left: {left}", flush=True)
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_no_gloo_thread_outlives_training(mode, data_dir, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           str(script), "pretrain", "--data", str(data_dir), "-o", str(tmp_path / "run"), "--parallel", mode,
           "--config", "glm-tiny-debug", "--steps", "2", "--warmup", "1", "--batch-size", "4", "--seq-len", "64",
           "--eval-every", "0", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(ln for ln in done.stdout.splitlines() if "gloo threads left" in ln) == \
        [f"rank {r} gloo threads left: []" for r in (0, 1)], done.stdout
