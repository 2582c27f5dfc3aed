"""The `distill` recipe stage and `llmcompress distill --recover` on a tiny Llama folder."""

import pytest
import torch
import yaml
from _tiny import assert_user_error, cli
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.formats import QuantLinear, Sparse24Linear
from llmcompress.models import load
from llmcompress.recover import sparse24_keep

runner = CliRunner()
call = cli
TINY = ["--num-samples", 4, "--seq-len", 32, "--batch-size", 2, "--local-steps", 2, "--global-steps", 2]


def _formats(graph) -> set[str]:
    return {m.weight_format for m in graph.model.layers.modules() if isinstance(m, (QuantLinear, Sparse24Linear))}


def test_distill_stage_in_a_recipe(tiny_hf_dir, corpus_file, tmp_path):
    from llmcompress.pipeline import load_recipe, run_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": str(tiny_hf_dir), "output": str(tmp_path / "run"),
        "data": {"source": str(corpus_file), "heldout_rows": 10, "seq_len": 32},
        "stages": [{"type": "prune", "method": "magnitude", "pattern": "2:4"},
                   {"type": "quantize", "scheme": "w4a16", "method": "rtn", "group_size": 32},
                   {"type": "distill", "name": "recover", "num_samples": 4, "seq_len": 32, "batch_size": 2,
                    "local_steps": 2, "global_steps": 2, "hidden_layers": [1, 3],
                    "checkpoint": str(tmp_path / "ckpt")},
                   {"type": "eval", "speed": False, "ppl_seq_len": 32}]}))
    rec, base = load_recipe(recipe)
    result = run_recipe(rec, base)
    distill = result.stages[2]
    # tokens: 4 layers x 2 steps x 2 sequences x 32, then 2 global steps x 2 x 32
    assert distill.type == "distill" and distill.report["tokens"] == 4 * 2 * 2 * 32 + 2 * 2 * 32
    assert distill.report["kl_after"] is not None and (tmp_path / "ckpt" / "state.json").exists()
    quantized = load(str(result.stages[1].folder / "model"))
    recovered = load(str(distill.folder / "model"))
    assert _formats(recovered) == {"sparse24_int4"}
    a, b = quantized.model.layers[0].mlp.down_proj, recovered.model.layers[0].mlp.down_proj
    assert torch.equal(sparse24_keep(a), sparse24_keep(b)) and not torch.equal(a.dequantize(), b.dequantize())
    assert result.stages[3].report["perplexity"]["perplexity"] > 1
    # a rerun skips the finished stage
    assert run_recipe(rec, base).stages[2].skipped


def test_distill_recover_cli(tiny_hf_dir, corpus_file, tmp_path):
    data = ["--data", corpus_file, "--heldout-rows", 10]
    assert call("prune", tiny_hf_dir, "--method", "magnitude", "--out", tmp_path / "p").exit_code == 0
    r = call("distill", "--recover", tmp_path / "p", "--teacher", tiny_hf_dir, *data, *TINY, "--out", tmp_path / "o")
    assert r.exit_code == 0, r.output
    assert "KL to the teacher" in r.output and (tmp_path / "o-checkpoint" / "state.json").exists()
    assert _formats(load(str(tmp_path / "o"))) == {"sparse24"}


@pytest.mark.parametrize("case", ["no_model", "no_out", "quantizer", "hidden_loss", "budget", "exists", "teacher"])
def test_bad_input_is_one_line_exit_2(case, tiny_hf_dir, corpus_file, tmp_path, tokenizer):
    args = ["--data", corpus_file, "--heldout-rows", 10, *TINY]
    model, out = ["--recover", tiny_hf_dir, "--teacher", tiny_hf_dir], ["--out", tmp_path / "o"]
    if case == "no_model":
        r, msg = call("distill", *args, *out), "give the compressed model to recover: --recover FOLDER"
    elif case == "no_out":
        r, msg = call("distill", *model, *args), "--out FOLDER"
    elif case == "quantizer":
        r, msg = call("distill", *model, *args, *out, "--quantizer", "lsq"), "quantizer: Input should be 'ste' or"
    elif case == "hidden_loss":
        r, msg = call("distill", *model, *args, *out, "--hidden-loss", "l1"), "hidden_loss: Input should be 'mse' or"
    elif case == "budget":
        r, msg = call("distill", *model, *args, *out, "--global-steps", -1), "global_steps: Input should be greater"
    elif case == "exists":
        (tmp_path / "o").mkdir()
        r, msg = call("distill", *model, *args, *out), "already exists"
    else:  # a teacher the student was not compressed from
        from transformers import LlamaForCausalLM

        from _tiny import tiny_llama_config

        other = tmp_path / "other"
        LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), num_hidden_layers=2)).save_pretrained(other)
        tokenizer.save_pretrained(other)
        r = call("distill", "--recover", tiny_hf_dir, "--teacher", other, *args, *out)
        msg = "the student has 4 decoder layers and the teacher 2"
    assert_user_error(r, msg)
    assert case == "exists" or not (tmp_path / "o").exists()
