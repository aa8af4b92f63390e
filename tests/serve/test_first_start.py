"""What ``openglm serve`` prints on its first start works as printed, with what the ``serve`` extra installs."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement

from live_server import ServerProcess

ROOT = Path(__file__).resolve().parents[2]


def first_start(tiny_checkpoint, tmp_path) -> tuple[ServerProcess, dict[str, str]]:
    """A server on an empty database, and its printed examples: {"key", "curl", "python"}."""
    server = ServerProcess(tiny_checkpoint, f"sqlite:///{tmp_path / 'first.db'}", "--max-seq-len", "96")
    lines, deadline = [], time.monotonic() + 60
    while not any(line.startswith("  chat page: ") for line in lines):
        line = server.proc.stdout.readline()
        assert line and time.monotonic() < deadline, f"no examples printed:\n{''.join(lines)}"
        lines.append(line)
    text = "".join(lines)
    key = re.search(r"^API key: (sk-glm-\S+)$", text, re.M).group(1)
    curl = re.search(r"^  (curl .*)$", text, re.M).group(1)
    python = re.search(r"^  (python -c .*)$", text, re.M).group(1)
    return server, {"key": key, "curl": curl, "python": python}


def run_printed(command: str) -> subprocess.CompletedProcess:
    # `python` on the printed line is the one this test runs under, as it is after the README's command.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)


def test_printed_examples_work_against_the_server(tiny_checkpoint, tmp_path):
    server, printed = first_start(tiny_checkpoint, tmp_path)
    try:
        server.wait_ready()
        assert printed["key"] in printed["curl"] and printed["key"] in printed["python"]
        if shutil.which("curl"):
            done = run_printed(printed["curl"])
            assert done.returncode == 0, done.stderr
            reply = json.loads(done.stdout)
            assert reply["object"] == "chat.completion" and reply["usage"]["completion_tokens"] > 0, reply
        done = run_printed(printed["python"])
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
    finally:
        server.stop()


def test_the_serve_extra_installs_what_the_python_example_imports(tiny_checkpoint, tmp_path):
    server, printed = first_start(tiny_checkpoint, tmp_path)
    server.stop()
    code = shlex.split(printed["python"])[2]  # python -c CODE
    modules = {node.module.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.ImportFrom)}
    modules |= {a.name.split(".")[0] for node in ast.walk(ast.parse(code)) if isinstance(node, ast.Import)
                for a in node.names}
    assert modules == {"openai"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    serve = {Requirement(r).name.lower() for r in project["optional-dependencies"]["serve"]}
    installs = {dist.lower() for m in modules for dist in packages_distributions().get(m, [m])}
    assert installs <= serve, f"`pip install -e .[serve]` does not install {installs - serve}"

