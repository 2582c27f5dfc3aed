"""Recipes (typed, strict, overridable) and the resumable pipeline."""

import json
from pathlib import Path

import pytest
import yaml

from llmcompress.models import load
from llmcompress.pipeline import apply_overrides, load_recipe, run_recipe


def write_recipe(tmp_path, model_dir, data_file, **over):
    recipe = {
        "model": str(model_dir),
        "output": str(tmp_path / "run"),
        "data": {"source": str(data_file), "heldout_rows": 10, "seq_len": 32},
        "stages": [
            {"type": "eval", "name": "before", "speed": False, "ppl_seq_len": 32},
            {"type": "prune_layers", "name": "prune", "num_layers": 2, "num_samples": 4, "seq_len": 32},
            {"type": "eval", "name": "after", "speed": False, "ppl_seq_len": 32},
        ],
    }
    recipe.update(over)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_recipe_overrides_by_index_and_name():
    raw = {"data": {"seq_len": 8}, "stages": [{"type": "eval"}, {"type": "prune_layers", "name": "p", "num_layers": 1}]}
    apply_overrides(raw, ["data.seq_len=16", "stages.p.num_layers=3", "stages.0.speed=false", "output=x"])
    assert raw["data"]["seq_len"] == 16 and raw["stages"][1]["num_layers"] == 3
    assert raw["stages"][0]["speed"] is False and raw["output"] == "x"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_overrides(raw, ["nonsense"])
    with pytest.raises(ValueError, match="no stage 'zzz'"):
        apply_overrides(raw, ["stages.zzz.num_layers=1"])


@pytest.mark.parametrize("text, message", [
    ("model: [unclosed", "not valid YAML at line 1"),
    ("- just\n- a list\n", "must be a mapping"),
    ("output: o\nstages: [{type: eval, bogus: 1}]\n", "unknown key 'stages.0.bogus'"),
    ("output: o\nstages: [{type: eval}]\nextra_top: 1\n", "unknown key 'extra_top'"),
    ("output: o\nstages: [{type: prune_layers, num_layers: many}]\n", "stages.0.num_layers: Input should be a valid integer"),
    ("output: o\nstages: [{type: teleport}]\n", "unknown stage type 'teleport'"),
    ("output: o\nstages: []\n", "stages"),
    ("output: o\nstages: [{type: eval}, {type: eval}]\n", "used twice"),
    ("stages: [{type: eval}]\n", "output: Field required"),
])
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_recipe(path)


def test_missing_recipe(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_run_resume_and_from(tmp_path, tiny_hf_dir, corpus_file):
    recipe, base = load_recipe(write_recipe(tmp_path, tiny_hf_dir, corpus_file))
    first = run_recipe(recipe, base)
    assert [s.skipped for s in first.stages] == [False, False, False]
    out = tmp_path / "run"
    assert (out / "01-prune" / "model" / "config.json").exists()
    assert not (out / "00-before" / "model").exists()  # eval does not copy the model
    pruned = load(str(out / "01-prune" / "model"))
    assert len(pruned.model.layers) == 2
    report = json.loads((out / "01-prune" / "report.json").read_text())
    assert len(report["removed_layers"]) == 2
    summary = json.loads((out / "summary.json").read_text())
    assert [r["stage"] for r in summary] == ["before", "after"]
    assert summary[1]["params"] < summary[0]["params"]
    assert "| before |" in (out / "summary.md").read_text()

    again = run_recipe(recipe, base)
    assert [s.skipped for s in again.stages] == [True, True, True]
    assert again.summary == first.summary

    forced = run_recipe(recipe, base, from_stage="after")
    assert [s.skipped for s in forced.stages] == [True, True, False]

    # a changed stage reruns, and so does everything after it
    changed, base = load_recipe(write_recipe(tmp_path, tiny_hf_dir, corpus_file), ["stages.prune.num_layers=1"])
    third = run_recipe(changed, base)
    assert [s.skipped for s in third.stages] == [True, False, False]
    assert len(load(str(out / "01-prune" / "model")).model.layers) == 3

    with pytest.raises(ValueError, match="not a stage"):
        run_recipe(recipe, base, from_stage="nope")


def test_output_folder_that_is_not_a_run(tmp_path, tiny_hf_dir, corpus_file):
    recipe, base = load_recipe(write_recipe(tmp_path, tiny_hf_dir, corpus_file))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_recipe(recipe, base)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_failing_stage_leaves_no_partial_folder(tmp_path, tiny_hf_dir, corpus_file):
    recipe, base = load_recipe(write_recipe(tmp_path, tiny_hf_dir, corpus_file), ["stages.prune.num_layers=9"])
    with pytest.raises(ValueError, match="num_layers=9"):
        run_recipe(recipe, base)
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["00-before", "run.json"]


def test_prune_layers_as_noop_keeps_layer_count(tmp_path, tiny_hf_dir, corpus_file):
    recipe, base = load_recipe(write_recipe(tmp_path, tiny_hf_dir, corpus_file), ["stages.prune.as_noop=true"])
    run_recipe(recipe, base)
    cfg = json.loads((tmp_path / "run" / "01-prune" / "model" / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"]
    assert sum(b["attention"]["no_op"] and b["ffn"]["no_op"] for b in cfg["block_configs"]) == 2


def test_synthetic_data_comes_from_the_original_model(tmp_path, tiny_hf_dir):
    path = write_recipe(tmp_path, tiny_hf_dir, "synthetic")
    recipe, base = load_recipe(path, ["data.synthetic_rows=6", "data.synthetic_tokens=40", "data.heldout_rows=2",
                                      "data.seq_len=16", "stages.prune.seq_len=16", "stages.before.ppl_seq_len=16",
                                      "stages.after.ppl_seq_len=16"])
    run_recipe(recipe, base)
    run_recipe(recipe, base, from_stage="after")  # resumes on the pruned checkpoint
    cached = list((tmp_path / "cache" / "synthetic").glob("*.jsonl"))
    assert len(cached) == 1  # both runs sampled from the original model (same key), never the pruned one


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    from llmcompress.pipeline import load_recipe

    recipe, _ = load_recipe(path, [])
    assert recipe.stages
