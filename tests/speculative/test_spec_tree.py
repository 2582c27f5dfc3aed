"""Tree verification: the tree helpers, the tree-masked passes against plain passes, and exact greedy decoding."""

import copy
import json

import pytest
import torch
from typer.testing import CliRunner
from transformers import DynamicCache

from llmcompress.cli import app
from llmcompress.speculative.decode import target_decode
from llmcompress.speculative.draft_init import keep_layers
from llmcompress.speculative.evaluate import SpecEvalConfig, evaluate_speculative
from llmcompress.speculative.feature_draft import FeatureDraft, feature_speculative_decode, target_features
from llmcompress.speculative.lookup import LookupConfig
from llmcompress.speculative.tree import (TreeConfig, ancestor_mask, depths, draft_tree, feature_tree_decode,
                                          greedy_walk, keep_entries, merge_chain, reindex, select_subtree,
                                          subtree_with_chain, target_tree_pass)

#        root
#       /    \
#     0:7    1:8
#    /   \      \
#  2:9  3:4     4:9
#   |
#  5:2
TOKENS, PARENTS = [7, 8, 9, 4, 9, 2], [-1, -1, 0, 0, 1, 2]
PROMPTS = [[5, 17, 33, 2, 9, 5, 17, 33, 2, 9, 5, 17], [7, 8, 7, 8, 7], [11], [3, 40, 41, 42, 43, 44, 45]]


def test_ancestor_mask_and_depths():
    m = ancestor_mask(PARENTS)
    assert m[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert m[4].nonzero().flatten().tolist() == [1, 4]
    assert m.diagonal().all() and not m[0, 1] and not m[2, 3]
    assert depths(PARENTS) == [1, 1, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="before their children"):
        ancestor_mask([-1, 2, 0])


def test_select_subtree_takes_the_best_nodes_with_their_ancestors():
    scores = [-0.1, -2.0, -0.3, -1.0, -2.5, -0.4]
    assert select_subtree(scores, PARENTS, 3) == [0, 2, 5]
    assert select_subtree(scores, PARENTS, 4) == [0, 2, 3, 5]
    assert select_subtree(scores, PARENTS, 99) == list(range(6))
    # a tie between a parent and its child goes to the parent; an orphan (parent not chosen) is skipped
    assert select_subtree([0.0, -1.0, 0.0, -1.0, -1.0, -0.5], PARENTS, 2) == [0, 2]
    assert reindex([0, 2, 5], PARENTS) == [-1, 0, 1]
    assert reindex([1, 4], PARENTS) == [-1, 0]


def test_greedy_walk_follows_the_target_argmax():
    # argmax[0]: after the root; argmax[i + 1]: after node i
    argmax = [7, 9, 0, 2, 0, 0, 6]  # root -> 7 (node 0) -> 9 (node 2) -> 2 (node 5) -> 6 (no child): next token
    assert greedy_walk(TOKENS, PARENTS, argmax) == ([0, 2, 5], 6)
    assert greedy_walk(TOKENS, PARENTS, [8, 0, 5, 0, 0, 0, 0]) == ([1], 5)  # node 1's only child is 9, not 5
    assert greedy_walk(TOKENS, PARENTS, [3, 0, 0, 0, 0, 0, 0]) == ([], 3)  # no child of the root: a plain step
    assert greedy_walk([], [], [4]) == ([], 4)


def test_subtree_with_chain_keeps_the_chain_within_the_budget():
    tokens, parents = [7, 8, 9, 5, 6], [-1, -1, 0, 1, 2]  # 7 -> 9 -> 6, 8 -> 5
    scores = [-0.1, -0.5, -0.3, -2.0, -0.6]
    keep, toks, pars, nodes = subtree_with_chain(tokens, parents, scores, [7, 9, 1, 2], 4)  # shares 7 -> 9
    assert keep == [0, 2] and toks == [7, 9, 1, 2] and pars == [-1, 0, 1, 2] and nodes == [0, 1, 2, 3]
    keep, toks, pars, nodes = subtree_with_chain(tokens, parents, scores, [7, 9, 1, 2], 5)
    assert keep == [0, 1, 2] and toks == [7, 8, 9, 1, 2] and pars == [-1, -1, 0, 2, 3] and nodes == [0, 2, 3, 4]
    keep, toks, _, nodes = subtree_with_chain(tokens, parents, scores, [3, 4, 5], 2)  # a chain over budget is cut
    assert keep == [] and toks == [3, 4] and nodes == [0, 1]
    keep, toks, _, nodes = subtree_with_chain(tokens, parents, scores, [], 3)
    assert keep == select_subtree(scores, parents, 3) == [0, 1, 2] and toks == [7, 8, 9] and nodes == []


def test_merge_chain_shares_the_nodes_it_agrees_with():
    tokens, parents = list(TOKENS), list(PARENTS)
    assert merge_chain(tokens, parents, [7, 9, 3, 1]) == [0, 2, 6, 7]  # shares 7 -> 9, then two new nodes
    assert tokens[6:] == [3, 1] and parents[6:] == [2, 6]
    assert merge_chain(tokens, parents, [8]) == [1] and len(tokens) == 8  # wholly shared: nothing added
    assert merge_chain(tokens, parents, [5]) == [8] and parents[8] == -1


def _filled_cache(length: int) -> DynamicCache:
    cache = DynamicCache()
    for i in range(2):
        k = torch.arange(length, dtype=torch.float)[None, None, :, None].expand(1, 2, length, 3) + 100 * i
        cache.update(k.clone(), -k.clone(), i)
    return cache


@pytest.mark.parametrize("keep", [[0, 2, 5], [0, 1, 2], [0], [3]])
def test_keep_entries(keep):
    cache = _filled_cache(10)
    keep_entries(cache, 4, keep)  # positions 0..3 stay; of 4..9 the offsets `keep`
    want = list(range(4)) + [4 + k for k in keep]
    for i, layer in enumerate(cache.layers):
        assert layer.keys[0, 1, :, 0].tolist() == [w + 100 * i for w in want]
        assert layer.values[0, 0, :, 2].tolist() == [-(w + 100 * i) for w in want]


def _sharp(model):
    """`model` (in place) with attention scores 30x larger: a freshly initialised tiny model attends almost
    uniformly, which would hide a wrong position or mask."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30 ** 0.5)
    return model


def test_tree_pass_equals_plain_passes_along_each_path(tiny_target):
    """Each node's logits and features from the one tree-masked pass equal those of a plain causal pass over the
    context, the root and the node's path; the cache kept for one path equals the plain pass's cache."""
    tiny_target = _sharp(copy.deepcopy(tiny_target))  # the fixture is shared by the module
    ctx, root = torch.tensor([[5, 17, 33, 2, 9]]), 11
    cache = DynamicCache()
    target_features(tiny_target, ctx, cache)
    feats, logits = target_tree_pass(tiny_target, root, TOKENS, PARENTS, cache)
    assert feats.shape[0] == logits.shape[0] == 1 + len(TOKENS)
    anc = ancestor_mask(PARENTS)
    for i in [-1] + list(range(len(TOKENS))):
        path = [] if i < 0 else [TOKENS[j] for j in anc[i].nonzero().flatten().tolist()]
        plain = tiny_target(torch.cat([ctx, torch.tensor([[root] + path])], 1)).logits[0, -1]
        torch.testing.assert_close(logits[i + 1], plain, atol=1e-4, rtol=1e-4)
    keep_entries(cache, ctx.shape[1], [0, 1, 3, 6])  # the root and nodes 0, 2, 5
    ref = DynamicCache()
    target_features(tiny_target, torch.cat([ctx, torch.tensor([[root, 7, 9, 2]])], 1), ref)
    for a, b in zip(cache.layers, ref.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_draft_tree_equals_drafting_each_path_as_a_chain(tiny_target):
    """Every expanded node's draft logits equal those of feeding its path one token at a time, the draft's own
    predicted feature for each (the chain decoder's drafting)."""
    draft = _sharp(copy.deepcopy(FeatureDraft.from_target(tiny_target)))
    seq = torch.tensor([[5, 17, 33, 2, 9, 11]])
    feats = target_features(tiny_target, seq[:, :-1], None)  # [1, 5, D]
    g = draft_tree(draft, feats, seq[:, 1:], DynamicCache(), depth=3, topk=2)
    # 2 children of the root, 2 x 2 at depth 2, 2 x 2 below the 2 best of those; logits after each expanded node
    assert len(g["tokens"]) == 10 and len(g["logits"]) == 5 and {-1, 0, 1} <= set(g["logits"])
    anc = ancestor_mask(g["parents"])
    for node, logits in g["logits"].items():
        cache = DynamicCache()
        h, ql = draft(feats, seq[:, 1:], cache)
        for j in ([] if node < 0 else anc[node].nonzero().flatten().tolist()):
            h, ql = draft(h[:, -1:], torch.tensor([[g["tokens"][j]]]), cache)
        torch.testing.assert_close(logits, ql[0, -1], atol=1e-4, rtol=1e-4)
    # path scores: the sum of the draft's log-probabilities along the path
    for i, (t, p) in enumerate(zip(g["tokens"], g["parents"])):
        lp = torch.log_softmax(g["logits"][p].float(), -1)[t]
        assert g["scores"][i] == pytest.approx((g["scores"][p] if p >= 0 else 0.0) + float(lp), abs=1e-4)


def _wrong_feature_draft(target, scale=0.3):
    draft = FeatureDraft.from_target(target)
    with torch.no_grad():  # a draft that is often wrong, often by one rank
        draft.fc.weight.add_(torch.randn(draft.fc.weight.shape, generator=torch.Generator().manual_seed(0)) * scale)
    return draft


@pytest.mark.parametrize("depth,topk,tokens,stop", [(1, 1, 1, 0.0), (3, 2, 6, 0.0), (4, 3, 10, 0.0), (2, 4, 16, 0.0),
                                                    (4, 3, 8, 0.3)])
def test_tree_greedy_equals_target_greedy(tiny_target, depth, topk, tokens, stop):
    draft = _wrong_feature_draft(tiny_target)
    kept_beyond_top1 = 0
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 20)
        out, stats = feature_tree_decode(tiny_target, draft, prompt, 20, depth,
                                         TreeConfig(topk=topk, tokens=tokens, stop=stop))
        assert torch.equal(out, ref), ids
        assert stats.new_tokens == 20 and stats.target_calls == len(stats.accepted_per_call)
        assert max(stats.drafted_per_call) <= depth and max(stats.accepted_per_call) <= depth
        assert stats.accepted == sum(stats.accepted_per_call) and stats.drafted >= stats.accepted
        assert 0 <= stats.alpha <= 1 and stats.overlap_count >= stats.target_calls - 1
        kept_beyond_top1 += stats.accepted - stats.overlap_sum
    if topk > 1:  # tokens that were not the draft's first choice were kept: the tree's point
        assert kept_beyond_top1 > 0


def test_a_one_child_tree_is_the_chain(tiny_target):
    draft = _wrong_feature_draft(tiny_target, 0.1)
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        chain, cs = feature_speculative_decode(tiny_target, draft, prompt, 16, gamma=3)
        tree, ts = feature_tree_decode(tiny_target, draft, prompt, 16, 3, TreeConfig(topk=1, tokens=3))
        assert torch.equal(chain, tree)
        assert cs.accepted_per_call == ts.accepted_per_call and cs.alpha == pytest.approx(ts.alpha)


def test_tree_with_lookup_equals_target_greedy(tiny_target):
    draft = _wrong_feature_draft(tiny_target)
    looked, kept = 0, 0
    for ids in PROMPTS:
        prompt = torch.tensor([ids])
        ref, _ = target_decode(tiny_target, prompt, 20)
        out, stats = feature_tree_decode(tiny_target, draft, prompt, 20, 3, TreeConfig(topk=2, tokens=4),
                                         lookup=LookupConfig(max_ngram=3, min_ngram=1, tokens=5))
        assert torch.equal(out, ref), ids
        assert stats.lookup_accepted <= stats.lookup_proposed and stats.looked_up_per_call.count(True) == 0
        assert stats.drafted <= 4 * stats.target_calls  # the looked-up chain counts in the 4 verified tokens
        looked, kept = looked + stats.lookup_rounds, kept + stats.lookup_accepted
    assert looked > 0 and kept > 0


def test_tree_ends_at_eos_and_max_tokens(tiny_target):
    draft = _wrong_feature_draft(tiny_target)
    prompt = torch.tensor([PROMPTS[0]])
    ref, _ = target_decode(tiny_target, prompt, 12)
    eos = int(ref[0, prompt.shape[1] + 4])  # the fifth new token ends decoding
    ref_eos, _ = target_decode(tiny_target, prompt, 12, eos_token_id=eos)
    out, _ = feature_tree_decode(tiny_target, draft, prompt, 12, 3, TreeConfig(topk=2, tokens=6), eos_token_id=eos)
    assert torch.equal(out, ref_eos) and int(out[0, -1]) == eos
    one, stats = feature_tree_decode(tiny_target, draft, torch.tensor([[11]]), 1, 3)  # a one-token prompt
    assert one.shape == (1, 2) and stats.new_tokens == 1
    with pytest.raises(ValueError, match="depth"):
        feature_tree_decode(tiny_target, draft, prompt, 4, 0)


def test_evaluate_with_a_tree_and_its_refusals(tiny_target):
    draft = _wrong_feature_draft(tiny_target)
    prompts = [torch.tensor([PROMPTS[0]]), torch.tensor([PROMPTS[3]])]
    cfg = SpecEvalConfig(gammas=[2, 3], prompts=2, new_tokens=8, cost_steps=4, tree=TreeConfig(topk=2, tokens=5))
    r = evaluate_speculative(tiny_target, draft, prompts, cfg)
    assert r["tree"] == {"topk": 2, "tokens": 5, "stop": 0.0} and "tree-masked pass" in r["protocol"]
    for row in r["gammas"]:
        assert row["identical_output"] and row["expected_tau"] is None
        assert row["predicted_speedup"] == pytest.approx(row["tau"] / (row["gamma"] * r["cost_ratio_c"] + 1))
    json.dumps(r)
    with pytest.raises(ValueError, match="feature draft"):
        evaluate_speculative(tiny_target, keep_layers(tiny_target, [0]), prompts, cfg)
    with pytest.raises(ValueError, match="greedy"):
        evaluate_speculative(tiny_target, draft, prompts, cfg.model_copy(update={"temperature": 0.7}))
    with pytest.raises(ValueError):
        TreeConfig(topk=0)


def test_cli_eval_tree(tiny_hf_dir, corpus_file, tmp_path):
    runner = CliRunner()
    report = tmp_path / "r.json"
    base = ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file), "--heldout-rows",
            "10", "--spec-prompts", "1", "--spec-new-tokens", "6", "--gammas", "2"]
    r = runner.invoke(app, base + ["--draft", "feature:1", "--tree-topk", "2", "--tree-tokens", "4", "--tree-stop",
                                   "0.1", "--report", str(report)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["tree"] == {"topk": 2, "tokens": 4, "stop": 0.1} and spec["gammas"][0]["identical_output"]
    assert "top-2" in r.output, r.output
    for bad, hint in ((["--draft", "layers:2", "--tree-topk", "2"], "feature draft"),
                      (["--draft", "feature:1", "--tree-topk", "-1"], "--tree-topk"),
                      (["--draft", "feature:1", "--tree-topk", "2", "--tree-tokens", "0"], "--tree-tokens"),
                      (["--draft", "feature:1", "--tree-topk", "2", "--tree-stop", "1"], "--tree-stop")):
        r = runner.invoke(app, base + bad)
        assert r.exit_code == 2 and r.output.startswith("error:") and hint in r.output, r.output
