"""Shared fixtures: tiny Llama-family models and a tiny tokenizer, built in the test session."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in its CPU interpreter; this must happen before any test module imports triton
    # (the hardware and one-shot tests import the kernels through llmcompress.formats)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _tiny import make_texts, tiny_llama_config  # noqa: F401  (re-exported for fixtures)


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
