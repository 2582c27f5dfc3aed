"""Perplexity protocol, lm-eval on our model object, speed measurement."""

import json
import math
from pathlib import Path

import pytest
import torch

from llmcompress.evaluation import EvalConfig, evaluate, local_mc_task, measure_speed, perplexity
from llmcompress.models import load


@pytest.fixture(scope="module")
def graph(tiny_hf_dir):
    return load(str(tiny_hf_dir))


def test_perplexity_matches_hand_computation(graph):
    stream = torch.randint(0, graph.config.vocab_size, (70,))
    r = perplexity(graph, stream, seq_len=16, batch_size=3)
    windows = stream[:64].view(4, 16)
    with torch.no_grad():
        logp = torch.log_softmax(graph(windows).logits, -1)
    nll = -logp[:, :-1].gather(-1, windows[:, 1:, None]).mean()
    assert r["tokens"] == 4 * 15
    assert r["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert "4 non-overlapping windows of 16 tokens" in r["protocol"]
    assert perplexity(graph, stream, 16, max_windows=2)["tokens"] == 30
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(graph, stream[:10], 16)


def test_lm_eval_local_task(graph, tmp_path):
    rows = [{"input": "the quick brown", "choices": ["fox", "dog", "bird"], "gold": i % 3} for i in range(6)]
    path = tmp_path / "mc_tiny.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(perplexity=False, speed=False, tasks=[str(path)], task_limit=6)
    report = evaluate(graph, graph.tokenizer, cfg)
    acc = report["tasks"]["mc_tiny"]["acc"]
    # the same prompt every row: the model picks one answer, so it is right on exactly the rows with that gold
    assert acc == pytest.approx(1 / 3)
    assert report["tasks"]["mc_tiny"]["rows"] == 6


def test_local_task_config_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        local_mc_task(tmp_path / "nope.jsonl")


def test_speed_report(graph):
    s = measure_speed(graph, prefill_batch=2, prefill_len=16, decode_tokens=4, repeats=2)
    assert s["prefill_ms"] > 0 and s["decode_tok_s"] > 0 and s["peak_memory_mb"] > 0
    assert s["prefill_batch"] == 2 and s["decode_tokens"] == 4 and s["device"]


def test_evaluate_needs_heldout_for_perplexity(graph):
    with pytest.raises(ValueError, match="held-out"):
        evaluate(graph, graph.tokenizer, EvalConfig(speed=False))


SHARED_TASK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mc_epistemic_reasoning.jsonl"


@pytest.mark.skipif(not SHARED_TASK.exists(), reason="the project's shared data folder is not beside the checkout")
def test_lm_eval_on_shared_mc_task(graph):
    report = evaluate(graph, graph.tokenizer, EvalConfig(perplexity=False, speed=False, tasks=[str(SHARED_TASK)],
                                                         task_limit=4))
    metrics = report["tasks"]["mc_epistemic_reasoning"]
    assert metrics["rows"] == 4 and metrics["acc"] in (0, 0.25, 0.5, 0.75, 1.0)
