"""Training checkpoints: ``RUN_DIR/checkpoint/`` holds everything needed to continue a run exactly.

Layout::

    checkpoint/model.safetensors   full (unsharded) fp32 weights of the training module
    checkpoint/optimizer.pt        optimizer state (our own file: loaded with ``weights_only=True``)
    checkpoint/state.json          step, validation loss at that step, RNG states (python, numpy,
                                   torch), data-loader state, settings

A checkpoint is written into a temporary directory beside it, every file fsynced, then swapped in by
renames: the old one becomes ``checkpoint.prev`` before the new one takes its name. A crash at any
moment therefore leaves at least one complete checkpoint under one of the two names, and
``find_checkpoint`` takes the newest that exists. ``checkpoint.prev`` is removed after a successful
swap unless asked to keep it.

Retention (``keep``, ``keep_best``): instead of being removed, the replaced checkpoint becomes
``checkpoint-STEP`` (step zero-padded); the newest ``keep - 1`` of those stay beside ``checkpoint/``,
and with ``keep_best`` also the one with the lowest validation loss (measured at its own step).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import OpenGLMError
from ..utils import fsync_dir

CHECKPOINT = "checkpoint"
PREVIOUS = "checkpoint.prev"
KEPT_PREFIX = "checkpoint-"


def rng_state() -> dict:
    """The global RNG states of python, numpy and torch (CPU and CUDA) as JSON-able values."""
    state = {
        "python": _to_json(random.getstate()),
        "numpy": _to_json(np.random.get_state(legacy=False)),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = dict(state["numpy"], state=dict(state["numpy"]["state"]))
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def save_checkpoint(run_dir: str | Path, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    state: dict, keep_previous: bool = False, keep: int = 1, keep_best: bool = False) -> Path:
    """Write a checkpoint atomically into ``run_dir/checkpoint``; returns its path.

    model_state: full tensors by name; optimizer_state: ``optimizer.state_dict()`` (or its
    full-state-dict form); state: JSON-able (step, ``val_loss`` at that step or None, RNG, data
    loader, settings). keep / keep_best: see the module docstring.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{CHECKPOINT}.tmp-"))
    try:
        save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"))
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(tmp, final)
        fsync_dir(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if (keep > 1 or keep_best) and (previous / "state.json").is_file():
        step = json.loads((previous / "state.json").read_text(encoding="utf-8"))["step"]
        kept = run_dir / f"{KEPT_PREFIX}{step:08d}"
        if step != state["step"] and not kept.exists():
            os.replace(previous, kept)
        _prune(run_dir, keep, keep_best, state)
    if not keep_previous:
        shutil.rmtree(previous, ignore_errors=True)
    return final


def kept_checkpoints(run_dir: str | Path) -> list[tuple[Path, dict]]:
    """``(path, state.json)`` of the ``checkpoint-STEP`` directories of ``run_dir``, oldest first."""
    found = []
    for path in sorted(Path(run_dir).glob(f"{KEPT_PREFIX}[0-9]*")):
        if (path / "state.json").is_file():
            found.append((path, json.loads((path / "state.json").read_text(encoding="utf-8"))))
    return found


def _prune(run_dir: Path, keep: int, keep_best: bool, latest: dict) -> None:
    kept = kept_checkpoints(run_dir)
    stay = {path for path, _ in kept[max(0, len(kept) - (keep - 1)):]} if keep > 1 else set()
    if keep_best:
        scored = [(s["val_loss"], s["step"], path) for path, s in kept if s.get("val_loss") is not None]
        if scored:
            best = min(scored, key=lambda x: (x[0], x[1]))
            if latest.get("val_loss") is None or best[0] < latest["val_loss"]:
                stay.add(best[2])
    for path, _ in kept:
        if path not in stay:
            shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files and directories a killed run left in ``run_dir`` (a half-written
    checkpoint or model, an unfinished ``run.json``); returns what was removed."""
    removed = []
    for path in Path(run_dir).glob(".*.tmp*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """``run_dir/checkpoint`` if present, else ``run_dir/checkpoint.prev`` (left by a crash mid-swap), else None."""
    for name in (CHECKPOINT, PREVIOUS):
        path = Path(run_dir) / name
        if (path / "state.json").is_file():
            return path
    return None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(model_state, optimizer_state, state)`` of the checkpoint directory ``path``."""
    import pickle

    from safetensors import SafetensorError

    path = Path(path)
    try:
        model_state = load_file(str(path / "model.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise OpenGLMError(f"cannot read the training checkpoint in {path} ({reason}); it is damaged: resume "
                           f"from another checkpoint or start a new run") from None
    return model_state, optimizer_state, state
