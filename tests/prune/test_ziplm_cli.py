"""`llmcompress prune --method ziplm` and the `ziplm` recipe stage on a tiny Llama folder."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from _tiny import cli
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.hardware.profile import profile, save_table
from llmcompress.models import load
from llmcompress.models.graph import blocks

runner = CliRunner()
call = cli


@pytest.fixture(scope="module")
def table_file(tiny_hf_dir, tmp_path_factory):
    g = load(str(tiny_hf_dir))
    t = profile(g, batches=[1], prompt_len=16, gen_len=4, repeats=1, warmup=0, working_set_mb=0.5,
                ffn_fractions=[1, 2 / 3, 1 / 3])
    path = tmp_path_factory.mktemp("table") / "table.json"
    save_table(t, path)
    # one-sample timings of sub-millisecond blocks are noise (on a busy machine the head alone could outweigh
    # a target's whole budget): the searches get deterministic times, proportional to the parameters
    raw = json.loads(path.read_text())
    for entry in raw["entries"].values():
        for metric in ("prefill", "decode"):
            for timing in entry[metric].values():
                ms = 0.01 + 1e-5 * entry["params"]
                timing |= {"median_ms": ms, "min_ms": ms, "max_ms": ms}
    path.write_text(json.dumps(raw))
    return path


def test_ziplm_cli_writes_one_checkpoint_per_target(tiny_hf_dir, corpus_file, table_file, tmp_path):
    out = tmp_path / "z"
    args = ["prune", tiny_hf_dir, "--method", "ziplm", "--speedups", "1.3,1.1", "--cost-table", table_file,
            "--data", corpus_file, "--heldout-rows", 10, "--num-samples", 4, "--seq-len", 16, "--refine", 0,
            "--out", out]
    r = call(*args)
    assert r.exit_code == 0, r.output
    report = json.loads((out / "report.json").read_text())
    assert [m["target_speedup"] for m in report["models"]] == [1.1, 1.3]
    for m in report["models"]:
        assert m["predicted_speedup"] >= m["target_speedup"] * (1 - 1e-6)
        g = load(m["checkpoint"])
        assert [b.describe() for b in blocks(g)] == [
            ("noop" if a == 0 else f"gqa {2 * a}q/{a}kv") + " | " + ("noop" if f == 0 else f"mlp {f}")
            for a, f in m["choice"]]
    # a heterogeneous result loads in a fresh process with plain transformers
    het = next(m["checkpoint"] for m in report["models"] if len({tuple(c) for c in m["choice"]}) > 1)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True); "
            "print(m(torch.tensor([[1, 2, 3]])).logits.shape)")
    res = subprocess.run([sys.executable, "-c", code, het], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "torch.Size([1, 3," in res.stdout, res.stderr[-2000:]
    # rerun resumes from the database (same settings) and gives the same models
    r = call(*args)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "report.json").read_text())["models"][0]["choice"] == report["models"][0]["choice"]


def test_ziplm_cli_sensitivity_search_is_reported(tiny_hf_dir, corpus_file, table_file, tmp_path):
    out = tmp_path / "z"
    r = call("prune", tiny_hf_dir, "--method", "ziplm", "--speedups", "1.3", "--cost-table", table_file,
             "--data", corpus_file, "--heldout-rows", 10, "--num-samples", 4, "--seq-len", 16, "--refine", 0,
             "--search-steps", 5, "--out", out)
    assert r.exit_code == 0, r.output
    assert "search KL" in " ".join(r.output.split()) and " -> " in r.output
    s = json.loads((out / "report.json").read_text())["models"][0]["search"]
    assert s["steps"] == 5 and s["loss"] <= s["start_loss"] and 1 <= s["evaluations"] <= 6


def test_ziplm_cli_error_scale_records_the_removal_kl(tiny_hf_dir, corpus_file, table_file, tmp_path):
    out = tmp_path / "z"
    r = call("prune", tiny_hf_dir, "--method", "ziplm", "--speedups", "1.3", "--cost-table", table_file,
             "--data", corpus_file, "--heldout-rows", 10, "--num-samples", 4, "--seq-len", 16, "--refine", 0,
             "--error-scale", "removal_kl", "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "report.json").read_text())["models"][0]
    assert len(m["removal_kl"]) == 2 * len(m["choice"]) and all(k > 0 for k in m["removal_kl"])


@pytest.mark.parametrize("bad, message", [
    (["--speedups", "fast"], "must be comma-separated numbers"),
    (["--error-scale", "kl"], "--error-scale 'kl': choose none or removal_kl"),
    (["--search-steps", "-1"], "search_steps"),
    (["--speedups", "0.5"], "speedups must be"),
    (["--metric", "throughput"], "metric"),
])
def test_ziplm_cli_bad_input_is_one_line(tiny_hf_dir, corpus_file, table_file, tmp_path, bad, message):
    r = call("prune", tiny_hf_dir, "--method", "ziplm", "--cost-table", table_file, "--data", corpus_file,
             "--out", tmp_path / "z", *bad)
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and out.startswith("error:") and message in out, r.output
    assert not (tmp_path / "z").exists()


def test_ziplm_stage_in_a_recipe(tiny_hf_dir, corpus_file, table_file, tmp_path):
    recipe = {"model": str(tiny_hf_dir), "output": str(tmp_path / "run"),
              "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 16},
              "stages": [{"type": "ziplm", "speedups": [1.2, 1.4], "continue_with": 1.4, "num_samples": 4,
                          "seq_len": 16, "refine": 0, "cost_table": str(table_file),
                          "output": str(tmp_path / "family")},
                         {"type": "eval", "speed": False, "ppl_seq_len": 16, "ppl_max_windows": 2}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    r = call("run", path)
    assert r.exit_code == 0, r.output
    stage = json.loads((tmp_path / "run" / "00-ziplm" / "report.json").read_text())
    assert stage["continued_with"] == 1.4 and len(stage["models"]) == 2
    g = load(str(tmp_path / "run" / "00-ziplm" / "model"))
    want = json.loads((tmp_path / "family" / "speedup-1.4" / "config.json").read_text())
    assert g.config.block_configs == want.get("block_configs", g.config.block_configs)
