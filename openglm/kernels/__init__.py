"""Our CPU kernels (``cpu.cpp``), compiled on first use and cached: INT8/INT4 matrix products and decode attention.

PyTorch's packed weight-only CPU kernels are compute-bound at the one or few rows a decode step
multiplies (they reach a third of this kind of machine's memory bandwidth); ``kernels.cpp`` streams
the portable INT8/INT4 weights at close to the bandwidth. It has no dependency but a C++ compiler
and OpenMP: the first use builds it for this CPU (about a second) into
``$OPENGLM_CACHE`` (default ``~/.cache/openglm``), keyed by the source, the compiler and the CPU's
flags. Without a compiler, or with ``OPENGLM_KERNELS=0``, ``available()`` is False and
``QuantLinear`` uses PyTorch's kernels and attention PyTorch's SDPA: same results up to
rounding, slower.

Products with many activation rows (``DEQUANT_ROWS``, a prefill) are bound by arithmetic, not by
reading the weights, and the loops are made for the few rows of decoding: there the products round
the activations to int8 per group and use integer dot products over a tile of unpacked weight rows
(``int4_prefill_matmul``; ``int8_prefill_matmul`` where the CPU has VNNI), as llama.cpp does;
INT8 products elsewhere dequantize the weights a block of rows at a time and multiply in float32.

Under ``torch.compile`` the products are the custom operators ``openglm::int8_matmul`` and
``openglm::int4_matmul``; eager calls go to the library directly (less overhead per call). The build
registers them in C++ through PyTorch's stable operator API, so a compiled graph calls them
without entering Python (~4 us a call saved, ~70 calls a token); where that part cannot be built
they are registered from Python instead.

``decode_attention`` (one query per sequence and head over cached keys, as each decoding step
has) and the three-product forms (a layer's q, k and v in one call) come with the C++ registration
only; elsewhere ``cpp_operators_available()`` is False, the model calls SDPA and three products.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_state: dict[str, object] = {}


def cache_dir() -> Path:
    if os.environ.get("OPENGLM_CACHE"):
        return Path(os.environ["OPENGLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openglm"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _torch_flags() -> list[str]:
    """Compiler flags that add the operator registration (PyTorch's stable C++ API headers and libraries)."""
    from torch.utils.cpp_extension import include_paths, library_paths

    lib = library_paths()[0]  # libraries go after the source: linkers drop those named before what needs them
    return ["-DOPENGLM_TORCH_OPS", *(f"-I{p}" for p in include_paths()), "<source>", f"-L{lib}", "-ltorch_cpu",
            "-lc10", f"-Wl,-rpath,{lib}"]


def _compile(compiler: str, version: str, flags: list[str]) -> Path | None:
    """The library built with ``flags``, from the cache or compiled now (aside, then renamed whole)."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), version.encode(), " ".join(flags).encode(),
                                     _cpu_flags().encode(), torch.__version__.encode()])).hexdigest()[:16]
    target = cache_dir() / f"kernels-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler, *flags] + ([] if "<source>" in flags else ["<source>"])
        command = [str(SOURCE) if f == "<source>" else f for f in command] + ["-o", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            log.debug("kernel build failed:\n%s", done.stderr[-2000:])
            return None
        os.replace(tmp, target)
        return target
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("kernel build failed: %s", e)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(torch_ops: bool = True) -> ctypes.CDLL | None:
    """Build (or find in the cache) and load the library; ``torch_ops`` also registers its operators.

    Only one load may register the operators: other builds (e.g. for other instruction sets) pass
    ``torch_ops=False``.
    """
    if os.environ.get("OPENGLM_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        log.warning("no C++ compiler found: quantized layers use PyTorch's slower CPU kernels")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    target = _compile(compiler, version, FLAGS + _torch_flags()) if torch_ops else None
    if target is None:
        target = _compile(compiler, version, FLAGS)
        if target is None:
            log.warning("building the CPU kernels failed: quantized layers use PyTorch's slower kernels")
            return None
    lib = ctypes.CDLL(str(target))  # after torch: its OpenMP runtime (same soname) is the one used
    lib.openglm_q8_matmul.argtypes = [_P, _I, _I, _P, _P, _I, _P]
    lib.openglm_q8_matmul.restype = None
    lib.openglm_q4_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _P]
    lib.openglm_q4_matmul.restype = None
    lib.openglm_q8_dequant.argtypes = [_P, _P, _I, _I, _I, _P]
    lib.openglm_q8_dequant.restype = None
    lib.openglm_q4_dequant.argtypes = [_P, _P, _P, _I, _I, _I, _I, _P]
    lib.openglm_q4_dequant.restype = None
    lib.openglm_q4_prefill_matmul.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _P]
    lib.openglm_q4_prefill_matmul.restype = None
    if lib.openglm_q8_prefill_available():
        lib.openglm_q8_prefill_matmul.argtypes = [_P, _I, _I, _P, _P, _I, _P]
        lib.openglm_q8_prefill_matmul.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None where they cannot be (see the module doc)."""
    if "lib" not in _state:
        _state["lib"] = lib = _build(torch_ops="ops" not in _state)
        if lib is not None:
            _register(hasattr(lib, "openglm_torch_ops"))
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    return library() is not None


def supports(bits: int, in_features: int, group_size: int | None) -> bool:
    """Whether the kernels take this shape: K a multiple of 8 (INT8), or groups of a multiple of 32 up to 8192 (INT4)."""
    if bits == 8:
        return in_features % 8 == 0
    return bool(group_size) and group_size % 32 == 0 and group_size <= 8192 and in_features % group_size == 0


def _int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x = x.float().contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().openglm_q8_matmul(x.data_ptr(), M, K, weight.data_ptr(), scale.data_ptr(), N, y.data_ptr())
    return y


def _int4(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    x = x.float().contiguous()
    M, K = x.shape
    N, G = scale.shape
    y = torch.empty(M, N, dtype=torch.float32)
    library().openglm_q4_matmul(x.data_ptr(), M, K, weight.data_ptr(), scale.data_ptr(),
                                None if zero is None else zero.data_ptr(), G, N, y.data_ptr())
    return y


# From this many activation rows on (a prefill), INT8 products dequantize a block of weight rows at a
# time and run a float matrix product on it: measured on a 4096x768 layer, even with the loops at 48
# rows, 1.8x faster at 128, 2.2x at 512. INT4 products take int4_prefill_matmul: at 48 rows 2.4x
# faster than the loops on 4096x768 and 768x2048 layers (one thread; it passes them from 16 rows).
DEQUANT_ROWS = 48
_BLOCK_BYTES = 32 << 20  # float32 weights dequantized at a time


def int4_prefill_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                        zero: torch.Tensor | None) -> torch.Tensor:
    """``int4_matmul`` for many rows of ``x`` (a prefill): x rounded to int8 per (row, group), integer dot products.

    Each row's group of columns is scaled to -127..127 (as llama.cpp's q8_0 does) and meets the
    weight's nibbles in integer multiply-adds (VNNI's, where the CPU has them: four times the
    float ones per instruction); a tile of weight rows is unpacked once and reused over all rows
    of ``x``. Differs from the float product of the dequantized weight by at most
    ``sum_k |w[n, k]| * dx[m, g(k)] / 2`` (``dx`` = the group's largest ``|x|`` / 127).
    """
    x = x.float().contiguous()
    M, K = x.shape
    N, G = scale.shape
    y = torch.empty(M, N, dtype=torch.float32)
    library().openglm_q4_prefill_matmul(x.data_ptr(), M, K, weight.data_ptr(), scale.data_ptr(),
                                        None if zero is None else zero.data_ptr(), G, N, y.data_ptr())
    return y


def int8_prefill_available(in_features: int) -> bool:
    """Whether ``int8_prefill_matmul`` takes this layer: the CPU has VNNI and K is a multiple of 32."""
    lib = library()
    return lib is not None and in_features % 32 == 0 and bool(lib.openglm_q8_prefill_available())


def int8_prefill_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``int8_matmul`` for many rows of ``x`` (a prefill), x rounded to int8 per (row, 32 columns).

    As ``int4_prefill_matmul``, with the weight made unsigned (``w + 128``, the 128 taken off as a
    zero point); only where ``int8_prefill_available`` (without VNNI, sums of such byte products
    overflow the CPU's int16 pairs). Differs from the float product of the dequantized weight by at
    most ``sum_k |w[n, k]| * dx[m, k // 32] / 2``.
    """
    x = x.float().contiguous()
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    library().openglm_q8_prefill_matmul(x.data_ptr(), M, K, weight.data_ptr(), scale.data_ptr(), N, y.data_ptr())
    return y


def dequant_matmul(x: torch.Tensor, bits: int, weight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor | None, in_features: int) -> torch.Tensor:
    """``x [M, K] float32`` times the weight dequantized block by block (at most 32 MiB of floats at a time)."""
    K, N = in_features, scale.shape[0]
    rows = max(1, min(N, _BLOCK_BYTES // (4 * K)))
    y = None if rows == N else torch.empty(x.shape[0], N, dtype=torch.float32)
    block = torch.empty(rows, K, dtype=torch.float32)
    lib = library()
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        if bits == 8:
            lib.openglm_q8_dequant(weight.data_ptr(), scale.data_ptr(), K, n0, n1, block.data_ptr())
        else:
            lib.openglm_q4_dequant(weight.data_ptr(), scale.data_ptr(), None if zero is None else zero.data_ptr(),
                                   scale.shape[1], K, n0, n1, block.data_ptr())
        if n1 - n0 == N:
            return x @ block.t()
        y[:, n0:n1] = x @ block[: n1 - n0].t()
    return y


def _register(in_cpp: bool) -> None:
    """Make the ``openglm::`` operators exist once: from the library's C++, or from Python."""
    if "ops" in _state:
        return
    if not in_cpp:  # plain dispatcher registrations: a third of ``custom_op``'s call overhead
        ops = torch.library.Library("openglm", "DEF")
        ops.define("int8_matmul(Tensor x, Tensor weight, Tensor scale) -> Tensor")
        ops.define("int4_matmul(Tensor x, Tensor weight, Tensor scale, Tensor? zero) -> Tensor")
        ops.impl("int8_matmul", _int8, "CPU")
        ops.impl("int4_matmul", _int4, "CPU")
        _state["library"] = ops  # the registration lives as long as this object
    _state["ops"] = "C++" if in_cpp else "Python"

    @torch.library.register_fake("openglm::int8_matmul")
    def _(x, weight, scale):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("openglm::int4_matmul")
    def _(x, weight, scale, zero):
        return x.new_empty(x.shape[0], weight.shape[0], dtype=torch.float32)

    if in_cpp:
        @torch.library.register_fake("openglm::decode_attention")
        def _(q, k, v, mask, scale):
            return q.new_empty(q.shape, dtype=torch.float32)

        @torch.library.register_fake("openglm::int8_matmul3")
        def _(x, w0, s0, w1, s1, w2, s2):
            return tuple(x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32) for w in (w0, w1, w2))

        @torch.library.register_fake("openglm::int4_matmul3")
        def _(x, w0, s0, z0, w1, s1, z1, w2, s2, z2):
            return tuple(x.new_empty(x.shape[0], w.shape[0], dtype=torch.float32) for w in (w0, w1, w2))


@torch.compiler.assume_constant_result  # run, not traced, when a graph is compiled
def cpp_operators_available() -> bool:
    """Whether ``decode_attention`` and the three-product operators run here (the kernels built with their C++ operators)."""
    return library() is not None and _state.get("ops") == "C++"


def int8_matmul3(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three INT8 products of one ``x [M, K]``, ``weights`` = ``w0, scale0, w1, scale1, w2, scale2``, in one call."""
    return torch.ops.openglm.int8_matmul3(x, *weights)


def int4_matmul3(x: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three INT4 products of one ``x [M, K]`` with the same group size, ``weights`` = ``w0, scale0, zero0, ...``."""
    return torch.ops.openglm.int4_matmul3(x, *weights)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Attention of ``q [B, H, 1, D]`` over ``k, v [B, KH, S, D]`` (float32, CPU) -> ``[B, H, 1, D]``.

    ``mask``: bool ``[B or 1, 1, 1, S]``, True = may attend, or None (every key); query head ``h``
    reads key/value head ``h // (H // KH)``, as SDPA's ``enable_gqa``.
    """
    if "lib" not in _state:
        library()
    return torch.ops.openglm.decode_attention(q, k, v, mask, scale)


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ (weight [N, K] int8 * scale [N] bf16)^T`` -> float32 ``[M, N]`` (``available()`` must hold)."""
    if torch.compiler.is_compiling():
        return torch.ops.openglm.int8_matmul(x, weight, scale)
    return _int8(x, weight, scale)


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K]`` times the portable INT4 weight ``[N, K/2]`` (scale/zero ``[N, G]``) transposed -> float32 ``[M, N]``."""
    if torch.compiler.is_compiling():
        return torch.ops.openglm.int4_matmul(x, weight, scale, zero)
    return _int4(x, weight, scale, zero)
