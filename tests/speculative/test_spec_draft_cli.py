"""`llmcompress draft` and the recipe stage `draft`."""

import json

import yaml
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.models import load
from llmcompress.pipeline import load_recipe, run_recipe


def _call(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_draft_command_trains_saves_and_resumes(tiny_hf_dir, corpus_file, tmp_path):
    args = ["draft", "--target", tiny_hf_dir, "--init", "layers:2", "--divergence", "jsd:0.5", "--data", "fixed",
            "--steps", 2, "--prompt-tokens", 8, "--new-tokens", 8, "--num-samples", 8, "--eval-every", 2,
            "--eval-prompts", 1, "--eval-new-tokens", 8,
            "--corpus", corpus_file, "--heldout-rows", 10, "--out", tmp_path / "d"]
    r = _call(*args)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["steps"] == 2 and [e["step"] for e in report["acceptance"]] == [0, 2]
    draft = load(str(tmp_path / "d" / "model"))
    assert len(draft.model.layers) == 2 and draft.tokenizer is not None
    r = _call(*(args[:10] + [4] + args[11:]))  # a larger budget resumes from the checkpoint at step 2
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert [e["step"] for e in report["acceptance"]] == [0, 2, 4]


def test_draft_command_errors(tiny_hf_dir, corpus_file):
    for extra, msg in ((["--divergence", "kl"], "unknown divergence"), (["--data", "online"], "--data"),
                       (["--offline"], "on-policy"), (["--init", "layers:9"], "cannot keep 9 of 4")):
        r = _call("draft", "--target", tiny_hf_dir, "--corpus", corpus_file, "--heldout-rows", 10, *extra)
        assert r.exit_code == 2 and r.output.strip().startswith("error:"), r.output
        assert msg in " ".join(r.output.split()), r.output


def test_draft_stage_in_a_recipe(tiny_hf_dir, corpus_file, tmp_path):
    recipe = {"model": str(tiny_hf_dir), "output": str(tmp_path / "run"),
              "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 32},
              "stages": [{"type": "draft", "init": "layers:1", "output": str(tmp_path / "draft"), "steps": 2,
                          "data": "fixed", "online": False, "divergence": "tvd", "prompt_tokens": 8,
                          "new_tokens": 8, "num_samples": 8, "eval_every": 2, "eval_prompts": 1,
                          "eval_new_tokens": 8}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_recipe(*load_recipe(path, []))
    report = result.stages[0].report
    assert report["steps"] == 2 and report["draft_layers"] == 1 and not report["online"]
    assert (tmp_path / "draft" / "model" / "config.json").exists()
