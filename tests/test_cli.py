"""The command line: working commands, and one clear line + exit code 2 for every kind of bad input."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from llmcompress.cli import app

runner = CliRunner()


def call(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, message):
    out = result.output
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    lines = [l for l in out.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert message in " ".join(out.split()), out


def test_inspect(tiny_hf_dir):
    r = call("inspect", tiny_hf_dir)
    assert r.exit_code == 0, r.output
    assert "gqa 4q/2kv" in r.output and "mlp 96" in r.output and "homogeneous" in r.output


def test_eval_writes_report(tiny_hf_dir, corpus_file, tmp_path):
    report = tmp_path / "r.json"
    r = call("eval", tiny_hf_dir, "--data", corpus_file, "--heldout-rows", 10, "--seq-len", 32,
             "--decode-tokens", 4, "--prefill-len", 16, "--report", report)
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["perplexity"]["perplexity"] > 1 and data["speed"]["decode_tok_s"] > 0
    assert "held-out perplexity" in r.output
    assert_user_error(call("eval", tiny_hf_dir, "--no-speed", "--data", corpus_file, "--report", report),
                      "already exists")


def test_run_and_resume(tiny_hf_dir, corpus_file, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_hf_dir), "output": str(tmp_path / "out"),
        "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 32},
        "stages": [{"type": "eval", "name": "a", "speed": False, "ppl_seq_len": 32},
                   {"type": "prune_layers", "num_layers": 1, "num_samples": 2, "seq_len": 16},
                   {"type": "eval", "name": "b", "speed": False, "ppl_seq_len": 32}]}))
    r = call("run", recipe)
    assert r.exit_code == 0, r.output
    assert "| a |" in r.output and "| b |" in r.output
    r = call("run", recipe, "--set", "stages.b.ppl_max_windows=1")
    assert r.exit_code == 0 and r.output.count("skipped") == 2, r.output


@pytest.mark.parametrize("case", ["missing_model", "bad_yaml", "unknown_key", "wrong_type", "empty_data",
                                  "output_exists", "missing_recipe", "bad_set"])
def test_bad_input_is_one_line_exit_2(case, tiny_hf_dir, corpus_file, tmp_path):
    recipe = {"model": str(tiny_hf_dir), "output": str(tmp_path / "out"),
              "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 32},
              "stages": [{"type": "eval", "speed": False}]}
    path = tmp_path / "r.yaml"
    args, message = ["run", path], ""
    if case == "missing_model":
        recipe["model"] = str(tmp_path / "no-such-model")
        message = "not found"
    elif case == "unknown_key":
        recipe["stages"][0]["perplexity_windows"] = 3
        message = "unknown key 'stages.0.perplexity_windows'"
    elif case == "wrong_type":
        recipe["data"]["seq_len"] = "long"
        message = "data.seq_len: Input should be a valid integer"
    elif case == "empty_data":
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        recipe["data"]["source"] = str(empty)
        message = "has no text"
    elif case == "output_exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "mine.txt").write_text("x")
        message = "pass --overwrite"
    elif case == "missing_recipe":
        args, message = ["run", tmp_path / "nope.yaml"], "does not exist"
    elif case == "bad_set":
        args, message = ["run", path, "--set", "stages"], "is not KEY=VALUE"
    path.write_text("stages: [oops" if case == "bad_yaml" else yaml.safe_dump(recipe))
    if case == "bad_yaml":
        message = "not valid YAML"
    assert_user_error(call(*args), message)
    if case == "output_exists":
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine.txt"]
    elif case != "missing_recipe":
        # nothing half-written: no stage folder of a failed run
        assert not any((tmp_path / "out").glob("00-*")) if (tmp_path / "out").exists() else True


def test_eval_bad_inputs(tiny_hf_dir, tmp_path):
    assert_user_error(call("eval", tmp_path / "ghost"), "not found")
    assert_user_error(call("eval", tiny_hf_dir, "--dtype", "float8"), "--dtype")
    assert_user_error(call("eval", tiny_hf_dir, "--data", tmp_path / "none.jsonl"), "does not exist")
    assert_user_error(call("inspect", tmp_path), "no config.json")
