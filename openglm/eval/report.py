"""Side-by-side quality report for ``openglm eval --compare``: change versus the first model, and a plot.

Built for comparing one model with its quantized copies (full precision vs INT8 vs INT4 per group
size): perplexity per token relative to the first model, and multiple-choice accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from ..errors import OpenGLMError


def model_labels(models: list[str]) -> list[str]:
    """Short distinct names for the models: each path relative to the folder all of them share.

    ``runs/a/model`` and ``runs/b/model`` become ``a/model`` and ``b/model``. A label that would be
    just ``model`` keeps its run's name (``RUN/model``): every run's weights are in a folder of that name.
    """
    parts = [PurePath(m).parts for m in models]
    common = len(os.path.commonprefix(parts)) if len(models) > 1 else len(parts[0]) - 1
    labels = []
    for p in parts:
        rest = p[min(common, len(p) - 1):]
        if len(rest) == 1 and len(p) > 1 and rest[0] == "model":
            rest = p[-2:]
        labels.append(str(PurePath(*rest)))
    return labels


def _ppl_rows(results: list[dict]) -> list[tuple[str, list[float]]]:
    """(set [lang], perplexity per model) for every perplexity set of the first result."""
    rows = []
    for name, per_lang in results[0]["perplexity"].items():
        for lang in per_lang:
            rows.append((f"{name} [{lang}]", [r["perplexity"][name][lang]["perplexity"] for r in results]))
    return rows


def _mc_rows(results: list[dict]) -> list[tuple[str, list[float]]]:
    return [(name, [r["multiple_choice"][name]["acc"] for r in results]) for name in results[0]["multiple_choice"]]


def _mc_errors(results: list[dict], j: int) -> list[list[float]] | None:
    """Matplotlib ``yerr`` (below, above; in %) of model ``j``'s accuracies from their 95% intervals."""
    sets = results[j]["multiple_choice"].values()
    if not all("acc_ci95" in m for m in sets):
        return None
    return [[100 * (m["acc"] - m["acc_ci95"][0]) for m in sets], [100 * (m["acc_ci95"][1] - m["acc"]) for m in sets]]


def relative_table(results: list[dict]) -> str:
    """Markdown: each model's perplexity change versus the first model (in %) and accuracy change (points)."""
    base = results[0]["model"]
    lines = ["| set | metric | " + " | ".join(r["model"] for r in results[1:]) + " |",
             "|---|---|" + "---:|" * (len(results) - 1)]
    for label, ppl in _ppl_rows(results):
        lines.append(f"| {label} | ppl vs {base} | " + " | ".join(f"{p / ppl[0] - 1:+.2%}" for p in ppl[1:]) + " |")
    for label, acc in _mc_rows(results):
        lines.append(f"| {label} | acc vs {base} | " + " | ".join(f"{100 * (a - acc[0]):+.1f} pt" for a in acc[1:]) + " |")
    return "\n".join(lines)


def require_matplotlib():
    """``matplotlib.pyplot`` set up for files only, or a one-line error naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        raise OpenGLMError("--plot needs matplotlib: pip install 'openglm[eval]' (or matplotlib)") from None
    return plt


def plot_compare(results: list[dict], path: str | Path, labels: list[str] | None = None) -> Path:
    """Save ``compare_figure`` as PNG, SVG or PDF (by the file suffix) in ``path``."""
    fig = compare_figure(results, labels)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def compare_figure(results: list[dict], labels: list[str] | None = None):
    """A matplotlib figure: perplexity change versus the first model per set, and multiple-choice
    accuracy per set, one bar per model with its 95% interval and a dashed line at chance (1 / choices).
    Needs matplotlib (the ``eval`` extra)."""
    plt = require_matplotlib()
    labels = labels or model_labels([r["model"] for r in results])
    ppl, mc = _ppl_rows(results), _mc_rows(results)
    panels = [p for p in (("perplexity vs " + labels[0] + " (%)", ppl), ("accuracy", mc)) if p[1]]
    if not panels:
        raise OpenGLMError("nothing to plot: no perplexity or multiple-choice results")
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    width = 0.8 / len(results)
    for ax, (title, rows) in zip(axes[0], panels):
        for j, label in enumerate(labels):
            errors = None
            if title == "accuracy":
                values = [100 * v[j] for _, v in rows]
                errors = _mc_errors(results, j)
            else:
                values = [100 * (v[j] / v[0] - 1) for _, v in rows]
            ax.bar([i + j * width for i in range(len(rows))], values, width, label=label, yerr=errors, capsize=3)
        if title == "accuracy":
            for i, name in enumerate(r[0] for r in rows):
                chance = results[0]["multiple_choice"][name].get("chance")
                if chance is not None:
                    ax.hlines(100 * chance, i - width / 2, i + width * (len(results) - 0.5), colors="grey",
                              linestyles="dashed", label="chance" if i == 0 else None)
        ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(rows))])
        ax.set_xticklabels([r[0] for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("%")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
