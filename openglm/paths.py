"""Where bundled checkpoints live, and how a name or a path becomes a checkpoint directory."""

from __future__ import annotations

from pathlib import Path

from .errors import OpenGLMError

BUNDLED_DIR = Path(__file__).parent / "checkpoints"


def bundled_names() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """A checkpoint directory (or file inside one) by path, else a checkpoint bundled with the package."""
    path = Path(path_or_name)
    if path.exists():
        return path
    bundled = BUNDLED_DIR / str(path_or_name)
    if isinstance(path_or_name, str) and "/" not in path_or_name and bundled.is_dir():
        return bundled
    names = ", ".join(bundled_names()) or "none"
    raise OpenGLMError(f"no checkpoint at {str(path_or_name)!r} (not a path; bundled checkpoints: {names})")
