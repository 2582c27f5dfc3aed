"""Shared fixtures: tiny Llama-family models and a tiny tokenizer, built in the test session."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import os

# the user's model cache, captured before any test isolates it (the slow default-model test reuses it)
USER_CACHE = os.environ.get("LLMCOMPRESS_CACHE") or str(Path.home() / ".cache" / "llmcompress")

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing songs about rivers "
         "mountains cities and the long quiet roads between them").split()


def make_texts(n: int, seed: int = 0, words: int = 60) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(make_texts(50), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
    return fast


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny LlamaForCausalLM with a tokenizer: stands in for a user's local HF model folder."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(vocab_size=len(tokenizer))
    model = LlamaForCausalLM(cfg).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(60, seed=1)))
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tests never write to the user's cache (the slow default-model test overrides this)."""
    monkeypatch.setenv("LLMCOMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
