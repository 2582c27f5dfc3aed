"""A draft restricted to frequent token ids: exact head on the subset, nothing outside, still lossless."""

import json

import pytest
import torch
from _tiny import assert_user_error
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.models import load as load_graph
from llmcompress.speculative.decode import speculative_decode, target_decode
from llmcompress.speculative.draft_init import keep_layers
from llmcompress.speculative.vocab import (SubsetHead, frequent_tokens, head_mass, restrict_vocab, special_ids,
                                           token_counts)


def test_counts_and_frequent_tokens():
    counts = token_counts(torch.tensor([[3, 3, 1], [4, 4, 4]]), 6)
    assert counts.tolist() == [0, 1, 0, 2, 3, 0]
    assert frequent_tokens(counts, 2).tolist() == [3, 4]
    assert frequent_tokens(counts, 3, always=[5]).tolist() == [3, 4, 5]  # forced ids come first
    assert frequent_tokens(torch.zeros(5, dtype=torch.long), 2).tolist() == [0, 1]  # ties: lower ids
    with pytest.raises(ValueError, match="1..6"):
        frequent_tokens(counts, 7)
    with pytest.raises(ValueError, match="special tokens"):
        frequent_tokens(counts, 1, always=[0, 5])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        token_counts(torch.tensor([6]), 6)


def test_subset_head_matches_the_full_head_on_its_ids():
    torch.manual_seed(0)
    full = torch.nn.Linear(8, 20, bias=False)
    keep = torch.tensor([1, 4, 7, 19])
    head = SubsetHead(full.weight, keep)
    h = torch.randn(2, 3, 8)  # [B, S, D]
    out = head(h)  # [B, S, V]
    ref = full(h)
    assert out.shape == ref.shape
    torch.testing.assert_close(out[..., keep], ref[..., keep])
    rest = torch.ones(20, dtype=torch.bool)
    rest[keep] = False
    assert (out[..., rest] == torch.finfo(out.dtype).min).all()
    p = torch.softmax(out, -1)
    assert (p[..., rest] == 0).all() and torch.allclose(p.sum(-1), torch.ones(2, 3))
    out[..., keep].sum().backward()  # the kept rows stay trainable
    assert head.weight.grad is not None and head.weight.grad.shape == (4, 8)
    ref = ref.detach()
    assert head_mass(ref, keep) < 1 and head_mass(ref, torch.arange(20)).item() == pytest.approx(1)


def test_restricted_draft_is_lossless_and_cheaper(tiny_target):
    draft = keep_layers(tiny_target, [0])
    vocab = tiny_target.config.vocab_size
    keep = frequent_tokens(torch.arange(vocab).flip(0), 40, special_ids(tiny_target.tokenizer))
    restrict_vocab(draft, keep)
    assert draft.get_output_embeddings().weight.shape == (40, tiny_target.config.hidden_size)
    assert draft(torch.tensor([[5, 6]])).logits.shape[-1] == vocab
    with pytest.raises(ValueError, match="already restricted"):
        restrict_vocab(draft, keep)
    for ids in ([5, 17, 33, 2, 9], [7]):
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 16)
        for gamma in (1, 3):
            out, stats = speculative_decode(tiny_target, draft, prompt, 16, gamma=gamma)
            assert torch.equal(out, ref), (ids, gamma)
            assert stats.new_tokens == 16


def test_cli_eval_draft_vocab(tiny_hf_dir, corpus_file, tmp_path):
    report = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data",
                                 str(corpus_file), "--heldout-rows", "10", "--draft", "layers:2", "--gammas", "2",
                                 "--spec-prompts", "2", "--spec-new-tokens", "5", "--draft-vocab", "24",
                                 "--report", str(report)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["draft_vocab"] == 24 and spec["gammas"][0]["identical_output"] is True
    assert "head over 24 ids" in r.output


def test_draft_saved_with_its_vocabulary(tiny_hf_dir, corpus_file, tmp_path):
    runner = CliRunner()
    out = tmp_path / "d"
    train = ["draft", "--target", str(tiny_hf_dir), "--init", "layers:2", "--data", "fixed", "--steps", "2",
             "--prompt-tokens", "8", "--new-tokens", "8", "--num-samples", "8", "--eval-every", "2",
             "--eval-prompts", "1", "--eval-new-tokens", "4", "--corpus", str(corpus_file), "--heldout-rows", "10",
             "--out", str(out), "--draft-vocab", "30"]
    r = runner.invoke(app, train)
    assert r.exit_code == 0, r.output
    assert "LM head over 30 frequent ids" in " ".join(r.output.split())
    stored = json.loads((out / "model" / "draft_vocab.json").read_text())
    assert len(stored["ids"]) == 30 and stored["vocab_size"] == load_graph(tiny_hf_dir).config.vocab_size
    report = tmp_path / "r.json"
    common = ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file),
              "--heldout-rows", "10", "--draft", str(out / "model"), "--gammas", "2", "--spec-prompts", "1",
              "--spec-new-tokens", "5"]
    r = runner.invoke(app, common + ["--report", str(report)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["draft_vocab"] == 30 and spec["gammas"][0]["identical_output"] is True
    r = runner.invoke(app, common + ["--draft-vocab", "10"])
    assert_user_error(r, "already carries a vocabulary of 30 ids")
    (out / "model" / "draft_vocab.json").write_text("[1, 2]")
    r = runner.invoke(app, common)
    assert_user_error(r, "is not a draft vocabulary")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8, 9, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_linear_matches_linear(rows, with_bias):
    from llmcompress.models.modeling_llmcompress import head_linear

    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(5000, 24, generator=g), torch.randn(5000, generator=g) if with_bias else None
    x = torch.randn(1, rows, 24, generator=g)  # [B, S, D]: the W @ x^T path takes 2..8 rows
    y = head_linear(x, w, b)
    assert y.shape == (1, rows, 5000)
    assert torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-5)
