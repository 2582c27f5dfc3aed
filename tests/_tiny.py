"""Helpers shared by tests (a module name of its own: several conftest.py files exist)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# the user's model cache, captured before any test isolates it (the slow default-model test reuses it)
USER_CACHE = os.environ.get("LLMCOMPRESS_CACHE") or str(Path.home() / ".cache" / "llmcompress")

WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing songs about rivers "
         "mountains cities and the long quiet roads between them").split()


def make_texts(n: int, seed: int = 0, words: int = 60) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (words,), generator=g).tolist())
            for _ in range(n)]


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def cli(*args):
    """Run the llmcompress CLI in-process with every argument stringified. -> click Result"""
    from typer.testing import CliRunner

    from llmcompress.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, message: str) -> None:
    """The CLI failed as a user error: exit 2, one line starting 'error:' that contains `message`, no traceback."""
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in out and len([l for l in result.output.splitlines() if l.strip()]) == 1, result.output
    assert out.startswith("error:") and message in out, result.output
