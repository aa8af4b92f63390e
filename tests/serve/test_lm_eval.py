"""lm-evaluation-harness scores a multiple-choice task through the server (``local-completions``) exactly as it
scores it on the checkpoint with ``transformers`` (``hf``)."""

from __future__ import annotations

import json

import pytest
from live_server import serving

from openglm.paths import resolve_checkpoint

# Continuations the bundled model gets right and wrong: the accuracy compared is neither 0 nor 1.
ITEMS = [
    ("The capital of France is", [" Paris", " London", " Berlin"]),
    ("One, two, three,", [" four", " seven", " ten"]),
    ("Monday, Tuesday,", [" Wednesday", " Friday", " Sunday"]),
    ("January, February,", [" March", " June", " October"]),
    ("北京是中国的", ["首都", "河流", "苹果"]),
    ("The cat sat on the", [" mat", " sky", " idea"]),
    ("The United States of", [" America", " Europe", " Asia"]),
    ("He opened the door and", [" walked", " blue", " seven"]),
    ("In the morning, the sun", [" rises", " sleeps", " eats"]),
    ("1, 2, 3,", [" 4", " 9", " 7"]),
    ("春天来了，花", ["开了", "走了", "吃了"]),
]


def write_task(folder) -> str:
    """A multiple-choice task over a local JSONL file (the first choice is right); returns its name."""
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": 0}, ensure_ascii=False) + "\n"
                            for q, c in ITEMS), encoding="utf-8")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""", encoding="utf-8")
    return "tiny_mc"


@pytest.mark.slow
def test_lm_eval_through_the_server_equals_hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # a local JSON file: nothing to fetch
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    checkpoint = str(resolve_checkpoint("glm-tiny"))
    task = write_task(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)

    def evaluate(model: str, model_args: dict) -> dict:
        out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tasks,
                                      device="cpu", log_samples=True)
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        # per item: (log-likelihood, is greedy) of each choice
        return {"acc": out["results"][task]["acc,none"], "scores": [s["resps"] for s in samples]}

    hf = evaluate("hf", {"pretrained": checkpoint, "dtype": "float32"})
    with serving(checkpoint, f"sqlite:///{tmp_path / 'lm_eval.db'}", max_seq_len=512) as (server, store, secret,
                                                                                          account_id):
        monkeypatch.setenv("OPENAI_API_KEY", secret)
        served = evaluate("local-completions", {
            "model": "tiny", "base_url": server.url + "/v1/completions", "tokenizer_backend": "huggingface",
            "tokenizer": checkpoint, "max_retries": 1})
        ledger = store.ledger_totals(account_id)

    assert 0 < hf["acc"] < 1
    assert served["acc"] == hf["acc"]
    for hf_item, served_item in zip(hf["scores"], served["scores"], strict=True):
        for [(hf_ll, hf_greedy)], [(ll, greedy)] in zip(hf_item, served_item, strict=True):
            assert ll == pytest.approx(hf_ll, abs=1e-3) and greedy == hf_greedy
    # Every (context, choice) pair was one billed request.
    assert ledger["requests"] == sum(len(choices) for _, choices in ITEMS)
