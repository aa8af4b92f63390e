"""llama.cpp's ``llama-bench`` and ``llama-server``, found or built, for the benchmarks that compare with them.

    python bench/llama_cpp_tools.py [--llama-cpp DIR]     # print where the tools are, building them if need be

Looked for, in order: ``--llama-cpp DIR`` (a folder holding both, e.g. ``build/bin`` of a llama.cpp
checkout), ``$LLAMA_CPP_BIN``, ``PATH``, then the cache (``$OPENGLM_CACHE``, default
``~/.cache/openglm``, under ``llama-cpp/src-<version>/build/bin``). Found nowhere, they are built
there from the llama.cpp sources vendored in the ``llama-cpp-python`` sdist (``pip download
--no-binary :all: --no-deps llama-cpp-python==<version>``), which is about 15-25 minutes on two cores;
one build at a time (a lock file), the binaries cached.

The build names the instruction sets this CPU has (AVX2, FMA, F16C, AVX-512 with VNNI and BF16)
instead of ``GGML_NATIVE``, and leaves AMX off: on CPUs that list AMX in some VMs, a native build dies with
SIGILL. With these sets llama.cpp repacks its weights into its fastest CPU layouts.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is built
TOOLS = ("llama-bench", "llama-server")
BASE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
              "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF"]
# llama.cpp's option for each instruction set, by the flag /proc/cpuinfo lists for it
ISA_OPTIONS = {"avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "avx512f": "GGML_AVX512",
               "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return set()


def cmake_flags(cpu: set[str] | None = None) -> list[str]:
    """The build's options: each instruction set named on where this CPU has it (a binary built for
    AVX-512 dies with SIGILL on a CPU without it), AMX always off."""
    cpu = cpu_flags() if cpu is None else cpu
    return BASE_FLAGS + [f"-D{option}={'ON' if flag in cpu else 'OFF'}" for flag, option in ISA_OPTIONS.items()]


def cache_root() -> Path:
    if os.environ.get("OPENGLM_CACHE"):
        return Path(os.environ["OPENGLM_CACHE"]) / "llama-cpp"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openglm" / "llama-cpp"


def _has_tools(folder: Path | str | None) -> bool:
    return bool(folder) and all(os.access(Path(folder) / t, os.X_OK) for t in TOOLS)


def find(directory: str | None = None) -> Path | None:
    """The folder holding both tools, or None: ``directory``, ``$LLAMA_CPP_BIN``, ``PATH``, then the cache."""
    if directory:
        if not _has_tools(directory):
            raise SystemExit(f"error: {directory} does not hold {' and '.join(TOOLS)}")
        return Path(directory)
    candidates = [os.environ.get("LLAMA_CPP_BIN")]
    on_path = [shutil.which(t) for t in TOOLS]
    if all(on_path) and Path(on_path[0]).parent == Path(on_path[1]).parent:
        candidates.append(str(Path(on_path[0]).parent))
    candidates.append(str(cache_root() / f"src-{VERSION}" / "build" / "bin"))
    return next((Path(c) for c in candidates if _has_tools(c)), None)


def _run(command: list[str], log: Path, cwd: Path | None = None, progress: str | None = None) -> None:
    """Run ``command`` with its output in ``log``; with ``progress``, print its ``[ NN%]`` lines on one line."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            out.write(line)
            if progress and (m := re.match(r"\[\s*(\d+)%\]", line)):
                print(f"\r{progress}: {m.group(1):>3}%", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
    if proc.wait():
        raise SystemExit(f"error: {' '.join(command[:3])} ... failed (exit {proc.returncode}); see {log}")


def extract_vendored(archive: Path, target: Path) -> None:
    """The ``vendor/llama.cpp`` folder of a ``llama-cpp-python`` sdist, extracted as ``target``."""
    prefix = f"{archive.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name != prefix]
        for m in members:
            m.name = m.name[len(prefix):]
        if not members:
            raise SystemExit(f"error: {archive} holds no {prefix}")
        tar.extractall(target, members=members, filter="data")


def build(jobs: int | None = None) -> Path:
    """Build both tools into the cache from the ``llama-cpp-python`` sdist (a lock keeps it to one build)."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    source = root / f"src-{VERSION}"
    with open(root / "build.lock", "w") as lock:
        print(f"llama.cpp: waiting for any other build of it ({root / 'build.lock'})", file=sys.stderr)
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _has_tools(source / "build" / "bin"):  # built meanwhile by whoever held the lock
            return source / "build" / "bin"
        if not (source / "CMakeLists.txt").is_file():
            print(f"llama.cpp: downloading the llama-cpp-python {VERSION} sdist", file=sys.stderr)
            with tempfile.TemporaryDirectory(dir=root) as tmp:
                _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                      "-d", tmp, f"llama-cpp-python=={VERSION}"], root / "download.log")
                extract_vendored(next(Path(tmp).glob("llama_cpp_python-*.tar.gz")), Path(tmp) / "llama.cpp")
                os.replace(Path(tmp) / "llama.cpp", source)
        print(f"llama.cpp: configuring in {source / 'build'} (this CPU's instruction sets named, AMX off)",
              file=sys.stderr)
        _run(["cmake", "-B", "build", *cmake_flags()], source / "cmake.log", cwd=source)
        _run(["cmake", "--build", "build", "-j", str(jobs or os.cpu_count() or 2), "--target", *TOOLS],
             source / "build.log", cwd=source, progress="llama.cpp: building llama-server and llama-bench")
    return source / "build" / "bin"


def tools(directory: str | None = None, allow_build: bool = True) -> Path | None:
    """The folder of ``llama-bench`` and ``llama-server``: found, else built (``allow_build``), else None."""
    found = find(directory)
    if found is None and allow_build:
        if not shutil.which("cmake"):
            raise SystemExit("error: llama.cpp's tools are not found and cmake is not installed to build them")
        found = build()
    return found


def llama_bench(folder: Path, gguf: Path | str, threads: int, prompt: int = 0, gen: int = 0,
                repeats: int = 3) -> dict[str, float]:
    """``llama-bench`` speeds on ``gguf``: ``{"pp": prompt tokens/s, "tg": generated tokens/s}`` (those asked)."""
    command = [str(folder / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json",
               "-p", str(prompt), "-n", str(gen)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama-bench failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    out = {}
    for test in json.loads(done.stdout):
        out["pp" if test["n_gen"] == 0 else "tg"] = test["avg_ts"]
    return out


def server_command(folder: Path, gguf: Path | str, port: int, threads: int, parallel: int, context: int) -> list[str]:
    """``llama-server`` on ``gguf`` with ``parallel`` slots sharing ``context`` tokens, on 127.0.0.1:``port``."""
    return [str(folder / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
            "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel), "-c", str(context),
            "--alias", "bench", "--no-webui"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", help="a folder holding llama-bench and llama-server")
    ap.add_argument("--no-build", action="store_true", help="only look; do not build")
    args = ap.parse_args()
    folder = tools(args.llama_cpp, not args.no_build)
    print(folder if folder else "llama.cpp's tools: not found")


if __name__ == "__main__":
    main()
