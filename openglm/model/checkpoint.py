"""Checkpoints in the Hugging Face layout: ``config.json``, ``model.safetensors`` (or shards with an
index), ``tokenizer.json``, ``generation_config.json``.

Parameter names are those of ``transformers``' GLM classes, so dense checkpoints need no renaming;
other layouts (ChatGLM) are converted by ``openglm.model.convert``. MoE (``glm4_moe``) checkpoints
store each expert's projections apart and the dense MLPs' gate and up projections apart; openglm
holds one stacked tensor per expert projection and fused gate/up projections, and ``MOE_PIECES``
maps the names both ways. Loading builds the model on the meta device and assigns the tensors read
from safetensors (MoE pieces copied straight into their stacked tensor), so weights are never held twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import Config
from ..errors import OpenGLMError
from ..paths import resolve_checkpoint
from ..quant.quantize import QuantScheme, build_quantized
from ..utils import fsync_dir
from .glm import GLMForCausalLM

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 4 * 1024**3


def checkpoint_dir(path_or_name: str | Path) -> Path:
    """The checkpoint directory for a path (directory or a file in it) or a bundled name."""
    path = resolve_checkpoint(path_or_name)
    return path.parent if path.is_file() else path


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise OpenGLMError(f"{index} is not a safetensors index: {e}") from None
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise OpenGLMError(
            f"{directory} holds pickled weights (.bin/.pt); openglm reads only safetensors, which cannot "
            "run code. Convert them with `transformers` (save_pretrained(..., safe_serialization=True))."
        )
    raise OpenGLMError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {directory}")


def read_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """All tensors of ``files`` (memory-mapped reads) and the first file's metadata."""
    state, metadata = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                metadata = metadata or (sf.metadata() or {})
                for name in sf.keys():
                    t = sf.get_tensor(name)
                    state[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        except (OSError, SafetensorError) as e:  # truncated or foreign files
            raise OpenGLMError(f"cannot read {f}: {e}") from None
    return state, metadata


# HF glm4_moe tensor -> (our tensor, where the piece goes in it). ``e`` indexes the stacked experts;
# "gate"/"up" are the two halves of a fused ``gate_up_proj`` (gate rows first, as ``MLP`` splits it).
# Every other name is the same on both sides.
MOE_PIECES = [
    (r"(?P<p>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.gate_proj\.weight", "{p}.gate_up_proj", "gate"),
    (r"(?P<p>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.up_proj\.weight", "{p}.gate_up_proj", "up"),
    (r"(?P<p>model\.layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.down_proj\.weight", "{p}.down_proj", None),
    (r"(?P<p>model\.layers\.\d+\.mlp(?:\.shared_experts)?)\.gate_proj\.weight", "{p}.gate_up_proj.weight", "gate"),
    (r"(?P<p>model\.layers\.\d+\.mlp(?:\.shared_experts)?)\.up_proj\.weight", "{p}.gate_up_proj.weight", "up"),
]
# Our stacked or fused tensor -> its HF pieces (name template, half), the reverse of MOE_PIECES for
# saving; "{e}" marks a tensor stacked over the experts.
SPLIT_PIECES = [
    (r"(?P<p>model\.layers\.\d+\.mlp\.experts)\.gate_up_proj", [("{p}.{e}.gate_proj.weight", "gate"), ("{p}.{e}.up_proj.weight", "up")]),
    (r"(?P<p>model\.layers\.\d+\.mlp\.experts)\.down_proj", [("{p}.{e}.down_proj.weight", None)]),
    (r"(?P<p>model\.layers\.\d+\.mlp(?:\.shared_experts)?)\.gate_up_proj\.weight",
     [("{p}.gate_proj.weight", "gate"), ("{p}.up_proj.weight", "up")]),
]
# Names of float32 tensors whatever the model's dtype: the router chooses experts (as transformers keeps them).
# GLM-5's indexers weigh their heads in float32 too (transformers keeps indexer.weights_proj in float32).
ROUTER_TENSOR = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$|\.self_attn\.indexer\.weights_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def moe_piece(name: str) -> tuple[str, int | None, str | None] | None:
    """``(our tensor, expert or None, "gate"/"up"/None)`` for an HF tensor stored inside one of ours, else None."""
    for pattern, ours, half in MOE_PIECES:
        m = re.fullmatch(pattern, name)
        if m:
            e = m.groupdict().get("e")
            return ours.format(p=m["p"]), None if e is None else int(e), half
    return None


def _piece_index(expert: int | None, half: str | None, rows: int) -> tuple:
    """Index of a piece in its tensor; ``rows`` is the fused tensor's row count (2 x width)."""
    index = () if expert is None else (expert,)
    if half is not None:
        index += (slice(0, rows // 2) if half == "gate" else slice(rows // 2, rows),)
    return index


def hf_pieces(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MoE state dict in the HF per-expert layout: views of our tensors, no copies."""
    out = {}
    for name, t in state.items():
        for pattern, pieces in SPLIT_PIECES:
            m = re.fullmatch(pattern, name)
            if m:
                stacked = "{e}" in pieces[0][0]
                for e in range(t.shape[0]) if stacked else [None]:
                    for template, half in pieces:
                        out[template.format(p=m["p"], e=e)] = t[_piece_index(e, half, t.shape[-2])]
                break
        else:
            out[name] = t
    return out


# safetensors dtype names (the format's header) -> torch dtypes
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_entries(fh, path: Path) -> list[tuple[str, torch.dtype, list[int], int]]:
    """``(name, dtype, shape, absolute offset)`` of each tensor of an open safetensors file, in file order."""
    try:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        entries = [(name, _ST_DTYPES[e["dtype"]], e["shape"], 8 + size + e["data_offsets"][0])
                   for name, e in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise OpenGLMError(f"cannot read {path}: not a safetensors file ({e})") from None
    return sorted(entries, key=lambda entry: entry[3])


def _read_into(fh, offset: int, out: torch.Tensor, path: Path, name: str) -> None:
    """Read ``out``'s bytes (a contiguous tensor) from ``offset`` straight into it."""
    fh.seek(offset)
    if fh.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != out.numel() * out.element_size():
        raise OpenGLMError(f"cannot read {path}: {name} is truncated")


def read_moe_safetensors(files: list[Path], expected: dict[str, torch.Size], num_layers: int,
                         dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Read a ``glm4_moe`` checkpoint into our layout, each HF piece read straight into its place in the
    stacked tensor (with plain reads: a memory map would keep every piece resident beside its copy
    until the file closes, so the experts would be held twice). The router stays float32; tensors of
    layers past ``num_layers`` (the published multi-token-prediction layer) are skipped, as
    ``transformers`` does.
    """
    state, filled = {}, {}
    for f in files:
        try:
            fh = open(f, "rb")
        except OSError as e:
            raise OpenGLMError(f"cannot read {f}: {e}") from None
        with fh:
            for name, stored, shape, offset in _safetensors_entries(fh, f):
                layer = _LAYER.match(name)
                if layer and int(layer[1]) >= num_layers:
                    continue
                want = torch.float32 if ROUTER_TENSOR.search(name) else dtype
                want = want if want is not None and stored.is_floating_point else stored
                piece = moe_piece(name)
                if piece is None or piece[0] not in expected:
                    t = torch.empty(shape, dtype=stored)
                    _read_into(fh, offset, t, f, name)
                    state[name] = t.to(want)
                    continue
                ours, expert, half = piece
                if expert is not None and expert >= expected[ours][0]:
                    raise OpenGLMError(f"{f}: {name} names expert {expert}, its config has {expected[ours][0]}")
                if ours not in state:
                    state[ours] = torch.empty(expected[ours], dtype=want)
                    filled[ours] = set()
                target = state[ours][_piece_index(expert, half, expected[ours][-2])]  # a contiguous view
                if tuple(target.shape) != tuple(shape):
                    raise OpenGLMError(f"{f}: {name} has shape {tuple(shape)}, its config wants {tuple(target.shape)}")
                if target.dtype == stored:
                    _read_into(fh, offset, target, f, name)
                else:  # one expert's piece at a time in the stored dtype
                    t = torch.empty(shape, dtype=stored)
                    _read_into(fh, offset, t, f, name)
                    target.copy_(t)
                filled[ours].add((expert, half))
    for ours, got in filled.items():
        pieces = next(p for pattern, p in SPLIT_PIECES if re.fullmatch(pattern, ours))
        want = len(pieces) * (expected[ours][0] if "{e}" in pieces[0][0] else 1)
        if len(got) != want:
            raise OpenGLMError(f"checkpoint lacks {want - len(got)} of the {want} pieces of {ours} (per-expert or gate/up tensors)")
    return state


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """Raise a readable error if ``state`` does not fit ``model`` (names or shapes)."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state[k].shape)} vs config {tuple(expected[k])}"
             for k in expected if k in state and state[k].shape != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise OpenGLMError(f"weights in {source} do not match its config.json: " + "; ".join(problems))


def load_model(path_or_name: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint directory, or a checkpoint bundled with openglm by name (e.g. ``"glm-tiny"``).

    Returns a ``GLMForCausalLM`` in eval mode whose call ``model(input_ids)`` gives logits
    ``[batch, seq, vocab]``. ``dtype`` casts floating-point weights; by default they load in the
    ``torch_dtype`` of ``config.json`` (as stored when it has none). A quantized checkpoint (its
    scheme is in the safetensors metadata, see ``openglm.quant``) loads with its quantized modules.
    """
    directory = checkpoint_dir(path_or_name)
    config = Config.from_file(directory)
    if dtype is None:
        dtype = _recorded_dtype(directory)
    files = weight_files(directory)
    scheme = QuantScheme.from_metadata(_metadata(files[0]))
    if scheme is not None and torch.device(device).type != "cpu":
        raise OpenGLMError(f"{directory} is quantized ({scheme.label}); quantized models run on the CPU only")
    with torch.device("meta"):
        model = GLMForCausalLM(config)
        if scheme is not None:  # quantized modules to load the stored integer weights into
            build_quantized(model, scheme)
    if config.num_experts:
        expected = {k: v.shape for k, v in model.state_dict().items()}
        state = read_moe_safetensors(files, expected, config.num_layers, dtype)
    else:
        state, _ = read_safetensors(files, dtype)
    check_state_dict(model, state, directory)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval()


def _metadata(file: Path) -> dict[str, str]:
    try:
        with safe_open(str(file), framework="pt") as sf:
            return sf.metadata() or {}
    except (OSError, SafetensorError) as e:  # truncated or foreign files
        raise OpenGLMError(f"cannot read {file}: {e}") from None


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _recorded_dtype(directory: Path) -> torch.dtype | None:
    hf = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    return _DTYPES.get(hf.get("torch_dtype") or hf.get("dtype"))


def _shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    return shards + [current]


def save_model(model: GLMForCausalLM, directory: str | Path, tokenizer=None, generation_config: dict | None = None,
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None,
               storage_dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` (and optionally its tokenizer) as a Hugging Face checkpoint directory.

    ``storage_dtype`` stores floating-point weights in another dtype (e.g. bfloat16 to halve the
    files); ``config.json`` still records the model's own dtype, which ``load_model`` restores.

    The directory is written beside the target and swapped in by rename, so an interrupted save
    leaves the previous checkpoint intact.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().to(storage_dtype if storage_dtype and v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    model_dtype = next(n for n, d in _DTYPES.items() if d == model.model.norm.weight.dtype)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    scheme = getattr(model, "quantization", None)
    if config.num_experts and scheme is None:  # the published per-expert layout, which transformers reads
        state = {k: v.contiguous() for k, v in hf_pieces(state).items()}
    meta = {"format": "pt", **(scheme.to_metadata() if scheme else {}), **(metadata or {})}

    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700
        shards = _shards(state, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.save(tmp, torch_dtype=model_dtype)
        gen = {"eos_token_id": list(config.eos_token_id) or None, "pad_token_id": config.pad_token_id, **(generation_config or {})}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_in(tmp: Path, directory: Path) -> None:
    """Replace ``directory`` by ``tmp``; the old one is removed only once the new one is in place."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, old)
    os.replace(tmp, directory)
    fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
