"""`llmcompress prune` / `quantize` and the recipe stages on a tiny Llama folder."""

import pytest
import torch
import yaml
from _tiny import assert_user_error, cli
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.models import load

runner = CliRunner()
call = cli


def test_prune_then_quantize_cli(tiny_hf_dir, corpus_file, tmp_path):
    data = ["--data", corpus_file, "--heldout-rows", 10, "--num-samples", 4, "--seq-len", 32]
    r = call("prune", tiny_hf_dir, "--method", "sparsegpt", "--pattern", "2:4", *data, "--out", tmp_path / "p")
    assert r.exit_code == 0, r.output
    assert "sparsity: 0.5" in r.output and "4 sequences of 32 tokens" in r.output
    r = call("quantize", tmp_path / "p", "--scheme", "w4a16", "--method", "gptq", "--group-size", 32, *data,
             "--out", tmp_path / "q")
    assert r.exit_code == 0, r.output
    graph = load(str(tmp_path / "q"))
    mods = [m for m in graph.model.layers.modules() if isinstance(m, (QuantLinear, Sparse24Linear))]
    assert len(mods) == 4 * 7 and all(m.fmt == "sparse24_int4" and m.group_size == 32 for m in mods)
    w = mods[0].dequantize()
    assert bool(((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all())
    r = call("inspect", tmp_path / "q")
    assert r.exit_code == 0 and "sparse24_int4" in r.output, r.output


@pytest.mark.parametrize("case", ["group_size", "pattern", "method", "sparse_int8", "exists", "width"])
def test_bad_input_is_one_line_exit_2(case, tiny_hf_dir, corpus_file, tmp_path):
    data = ["--data", corpus_file, "--heldout-rows", 10, "--num-samples", 2, "--seq-len", 16]
    out = ["--out", tmp_path / "o"]
    if case == "group_size":  # the tiny model's FFN width 96 takes 32 only
        r = call("quantize", tiny_hf_dir, "--group-size", 64, *data, *out)
        msg = "group_size 64 does not divide the input width 96 of model.layers.0.mlp.down_proj; sizes that fit: 32"
    elif case == "pattern":
        r, msg = call("prune", tiny_hf_dir, "--pattern", "4:2", *data, *out), "0 < n < m"
    elif case == "method":
        r, msg = call("quantize", tiny_hf_dir, "--method", "awq", *data, *out), "method: Input should be 'gptq' or 'rtn'"
    elif case == "sparse_int8":
        assert call("prune", tiny_hf_dir, "--method", "magnitude", "--out", tmp_path / "p").exit_code == 0
        r, msg = call("quantize", tmp_path / "p", "--scheme", "w8a8", *data, *out), "2:4 + int8 has no kernel"
    elif case == "exists":
        (tmp_path / "o").mkdir()
        r, msg = call("prune", tiny_hf_dir, *data, *out), "already exists"
    else:
        r, msg = call("prune", tiny_hf_dir, "--pattern", "3:7", *data, *out), "not a multiple of 7"
    assert_user_error(r, msg)
    assert case == "exists" or not (tmp_path / "o").exists()


def test_recipe_stages(tiny_hf_dir, corpus_file, tmp_path):
    from llmcompress.pipeline import load_recipe, run_recipe
    from llmcompress.stages import StageContext

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_hf_dir), "output": str(tmp_path / "run"),
        "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 32},
        "stages": [{"type": "prune", "method": "wanda", "pattern": "4:8", "num_samples": 4, "seq_len": 32},
                   {"type": "quantize", "scheme": "w8a8", "method": "rtn", "smoothquant_alpha": 0.5,
                    "num_samples": 4, "seq_len": 32},
                   {"type": "eval", "speed": False, "ppl_seq_len": 32}]}))
    rec, base = load_recipe(recipe)
    result = run_recipe(rec, base)
    prune, quant, ev = (s.report for s in result.stages)
    assert prune["sparsity"] == 0.5 and prune["format"].startswith("dense")
    assert quant["formats"] == {"w8a8": 28} and quant["smoothed_linears"] == 4 * 6
    assert ev["perplexity"]["perplexity"] > 1
    graph = load(str(result.stages[1].folder / "model"))
    w = graph.model.layers[0].mlp.down_proj.dequantize()
    assert bool(((w.reshape(w.shape[0], -1, 8) != 0).sum(-1) <= 4).all())  # 4:8 kept through int8
    # a group size that does not fit is refused before any calibration data is read
    stage = load_recipe(recipe, ["stages.1.scheme=w4a16", "stages.1.smoothquant_alpha=null",
                                 "stages.1.method=gptq", "stages.1.group_size=64"])[0].stages[1]
    ctx = StageContext(corpus_fn=lambda: pytest.fail("data was read"), teacher_fn=lambda: None)
    with pytest.raises(ValueError, match="sizes that fit: 32"):
        stage.run(load(str(tiny_hf_dir)), ctx)
