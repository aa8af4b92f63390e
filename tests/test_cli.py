"""The command line as a user runs it: a real process, real files, clean errors."""

from __future__ import annotations

import subprocess
import sys


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "openglm", *args], capture_output=True, text=True, input=stdin, timeout=120)


def test_help_lists_the_verbs():
    r = run("--help")
    assert r.returncode == 0
    for verb in ("generate", "infill", "info", "convert", "tokenizer"):
        assert verb in r.stdout


def test_generate_and_infill_on_a_checkpoint(tiny_checkpoint):
    r = run("generate", str(tiny_checkpoint), "The General", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The General") and len(r.stdout) > len("The General\n")
    r = run("infill", str(tiny_checkpoint), "-", "--max-new-tokens", "4", "--temperature", "0", stdin="It reads [MASK] text.")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("It reads ") and r.stdout.rstrip().endswith(" text.") and "[MASK]" not in r.stdout


def test_sampling_with_seed_is_reproducible(tiny_checkpoint):
    args = ("generate", str(tiny_checkpoint), "GLM", "--max-new-tokens", "10", "--seed", "5", "--no-echo")
    assert run(*args).stdout == run(*args).stdout


def test_info_on_a_checkpoint_and_a_config_name(tiny_checkpoint):
    r = run("info", str(tiny_checkpoint))
    assert r.returncode == 0 and "parameters" in r.stdout and "tokenizer  " in r.stdout
    r = run("info", "glm-4-9b")
    assert "9,399,951,360" in r.stdout


def test_errors_are_one_clear_line(tmp_path, tiny_checkpoint):
    cases = [
        (("generate", str(tmp_path / "missing"), "hi"), "no checkpoint at"),
        (("info", "glm-6"), "neither a checkpoint"),
        (("infill", str(tiny_checkpoint), "no blanks here"), "no blank to fill"),
        (("generate", str(tiny_checkpoint), "hi", "--top-p", "2"), "top_p"),
    ]
    for args, message in cases:
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr)
        assert message in r.stderr and "Traceback" not in r.stderr
