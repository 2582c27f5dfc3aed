"""Initial drafts from the target's layers, and refusal of drafts with another vocabulary or tokenizer."""

from types import SimpleNamespace

import pytest
import torch

from _micro import micro_model
from llmcompress.models import save
from llmcompress.speculative.draft_init import check_compatible, evenly_spaced, init_draft, most_important


def test_evenly_spaced():
    assert evenly_spaced(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced(4, 2) == [0, 3] and evenly_spaced(4, 4) == [0, 1, 2, 3] and evenly_spaced(5, 1) == [0]
    with pytest.raises(ValueError, match="cannot keep 5 of 4"):
        evenly_spaced(4, 5)
    assert most_important(torch.tensor([0.5, 0.1, 2.0, 0.3]), 2) == [0, 2]


def test_layers_init_copies_the_kept_layers(tiny_target):
    draft = init_draft(tiny_target, "layers:2")
    assert len(draft.model.layers) == 2 and draft.init_layers == [0, 3] and len(tiny_target.model.layers) == 4
    assert torch.equal(draft.model.layers[1].mlp.up_proj.weight, tiny_target.model.layers[3].mlp.up_proj.weight)
    assert draft.model.layers[1].mlp.up_proj.weight is not tiny_target.model.layers[3].mlp.up_proj.weight
    assert draft.tokenizer is tiny_target.tokenizer
    ids = torch.tensor([[3, 4, 5]])
    assert draft(ids).logits.shape == tiny_target(ids).logits.shape  # the KV cache slots were renumbered too
    with pytest.raises(ValueError, match="layers:K"):
        init_draft(tiny_target, "layers:x")


def test_important_init_keeps_the_layers_that_matter(tiny_target):
    import copy

    target = copy.deepcopy(tiny_target)
    with torch.no_grad():  # layer 1 adds nothing to the residual stream: least important
        target.model.layers[1].self_attn.o_proj.weight.zero_()
        target.model.layers[1].mlp.down_proj.weight.zero_()
    draft = init_draft(target, "important:3", calib_tokens=torch.randint(0, 100, (2, 12)))
    assert draft.init_layers == [0, 2, 3]
    with pytest.raises(ValueError, match="calibration"):
        init_draft(target, "important:3")


def test_other_model_with_another_vocabulary_is_refused(tiny_target, tmp_path):
    other = micro_model(vocab=50)
    save(other, tmp_path / "other")
    with pytest.raises(ValueError, match="vocabulary has 50 entries"):
        init_draft(tiny_target, str(tmp_path / "other"))


def test_tokenizer_mismatch_is_refused(tiny_target):
    fake = SimpleNamespace(config=tiny_target.config, tokenizer=SimpleNamespace(
        get_vocab=lambda: dict(tiny_target.tokenizer.get_vocab(), zzz=10**6), bos_token_id=1, eos_token_id=2))
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_compatible(tiny_target, fake)
    same = SimpleNamespace(config=tiny_target.config, tokenizer=tiny_target.tokenizer)
    check_compatible(tiny_target, same)
