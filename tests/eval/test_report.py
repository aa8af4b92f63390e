"""``openglm eval --compare`` report: change versus the first model, and the plot file."""

from __future__ import annotations

import pytest

from openglm.eval.report import plot_compare, relative_table


def _result(model, ppl, acc):
    return {"model": model,
            "perplexity": {"test.jsonl": {"en": {"perplexity": ppl}}},
            "multiple_choice": {"mc.jsonl": {"acc": acc}}}


RESULTS = [_result("full", 100.0, 0.5), _result("int8", 100.4, 0.49), _result("int4", 103.0, 0.52)]


def test_relative_table():
    table = relative_table(RESULTS)
    assert "| test.jsonl [en] | ppl vs full | +0.40% | +3.00% |" in table
    assert "| mc.jsonl | acc vs full | -1.0 pt | +2.0 pt |" in table


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_compare(RESULTS, tmp_path / "quality.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
