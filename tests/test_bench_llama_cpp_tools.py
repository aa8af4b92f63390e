"""bench/llama_cpp_tools.py: where llama.cpp's tools are looked for, and the sdist's vendored sources extracted."""

from __future__ import annotations

import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import llama_cpp_tools  # noqa: E402


def _tools_in(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in llama_cpp_tools.TOOLS:
        (folder / name).write_text("#!/bin/sh\n")
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """No tools on PATH, in $LLAMA_CPP_BIN or in the cache."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LLAMA_CPP_BIN", raising=False)
    monkeypatch.setenv("OPENGLM_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_found_in_order_given_folder_environment_path_cache(nowhere, monkeypatch):
    assert llama_cpp_tools.find() is None
    assert llama_cpp_tools.tools(allow_build=False) is None
    cached = _tools_in(nowhere / "cache" / "llama-cpp" / f"src-{llama_cpp_tools.VERSION}" / "build" / "bin")
    assert llama_cpp_tools.find() == cached
    on_path = _tools_in(nowhere / "path")
    monkeypatch.setenv("PATH", str(on_path))
    assert llama_cpp_tools.find() == on_path
    from_env = _tools_in(nowhere / "env")
    monkeypatch.setenv("LLAMA_CPP_BIN", str(from_env))
    assert llama_cpp_tools.find() == from_env
    given = _tools_in(nowhere / "given")
    assert llama_cpp_tools.find(str(given)) == given


def test_a_folder_without_both_tools_is_refused(nowhere):
    half = nowhere / "half"
    half.mkdir()
    (half / "llama-bench").write_text("")
    (half / "llama-bench").chmod(0o755)
    with pytest.raises(SystemExit, match="does not hold llama-bench and llama-server"):
        llama_cpp_tools.find(str(half))


def test_the_vendored_sources_are_extracted_alone(tmp_path):
    archive = tmp_path / f"llama_cpp_python-{llama_cpp_tools.VERSION}.tar.gz"
    top = f"llama_cpp_python-{llama_cpp_tools.VERSION}"
    with tarfile.open(archive, "w:gz") as tar:
        for name, text in ((f"{top}/pyproject.toml", b"[project]\n"),
                           (f"{top}/vendor/llama.cpp/CMakeLists.txt", b"project(llama.cpp)\n"),
                           (f"{top}/vendor/llama.cpp/src/llama.cpp", b"int main() {}\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    llama_cpp_tools.extract_vendored(archive, tmp_path / "src")
    assert sorted(str(p.relative_to(tmp_path / "src")) for p in (tmp_path / "src").rglob("*") if p.is_file()) == [
        "CMakeLists.txt", "src/llama.cpp"]
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(SystemExit, match="holds no"):
        llama_cpp_tools.extract_vendored(empty, tmp_path / "none")


def test_the_build_names_only_the_instruction_sets_the_cpu_has():
    avx2_only = llama_cpp_tools.cmake_flags({"avx2", "fma", "f16c", "amx_tile", "amx_int8"})
    assert {"-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX512_VNNI=OFF",
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_NATIVE=OFF"} <= set(avx2_only)
    assert "-DGGML_AVX512=ON" in llama_cpp_tools.cmake_flags({"avx2", "avx512f"})
