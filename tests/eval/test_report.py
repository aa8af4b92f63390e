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


def test_model_labels_name_the_runs():
    from openglm.eval.report import model_labels

    assert model_labels(["runs/a/model", "runs/b/model"]) == ["a/model", "b/model"]
    assert model_labels(["glm-tiny", "runs/a/model"]) == ["glm-tiny", "runs/a/model"]
    assert model_labels(["runs/a/model"]) == ["a/model"]
    assert model_labels(["/x/runs/a/model", "/x/runs/a/model-int8"]) == ["a/model", "model-int8"]


def test_accuracy_panel_has_labels_intervals_and_chance():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from openglm.eval.report import compare_figure

    def result(model, correct):
        from openglm.eval.multiple_choice import MCResult

        mc = MCResult(items=40, correct=correct, correct_norm=correct, chance_sum=40 / 4).as_dict()
        return {"model": model, "perplexity": {}, "multiple_choice": {"mc.jsonl": mc}}

    fig = compare_figure([result("runs/base/model", 12), result("runs/chat/model", 20)])
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["chance", "base/model", "chat/model"]
    chance = [c for c in ax.collections if c.get_label() == "chance"]
    assert chance and chance[0].get_segments()[0][0][1] == pytest.approx(25.0)
    # one error bar per model: the 95% Wilson interval around 30% and 50% of 40 items
    bars = [c for c in ax.containers if getattr(c, "errorbar", None) is not None]
    assert len(bars) == 2
    segments = bars[1].errorbar.lines[2][0].get_segments()
    low, high = segments[0][0][1], segments[0][1][1]
    assert low < 50 < high and low == pytest.approx(35.2, abs=0.1) and high == pytest.approx(64.8, abs=0.1)
    plt.close(fig)
