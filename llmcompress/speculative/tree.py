"""Tree verification for a feature draft (EAGLE-2, Li et al. 2024; SpecInfer's tree attention), greedy.

A chain of gamma proposals is lost at its first miss. A weak draft often ranks the target's token second or
third, and where a decode step is bound by reading the weights the target scores several tokens for little
more than the price of one (SmolLM2 on 2 CPU cores through oneDNN: 9 tokens for about 1.1 decode steps, 17 for
about 1.4). So each round the draft grows a tree instead of a chain:

- depth 1: the `topk` best next tokens after the last accepted one;
- each further depth: the `topk` nodes of the previous depth with the highest path score (the sum of the
  draft's log-probabilities from the root) are fed to the draft in ONE pass, each attending to the true
  context and its own ancestors, and each proposes its `topk` best children;
- the `tokens` best-scored nodes (a subtree: every chosen node's parent is chosen) go to the target in ONE
  pass, with a mask that lets each node see the context and its ancestors, at position context + depth;
- the target's argmax after the root and after each node picks the accepted path: from the root, follow the
  child that carries the target's argmax while one does; the argmax after the path's end is the next token.

The output is the target's greedy output token for token (each kept token is the target's argmax after the
tokens before it). The target's KV cache then keeps the root and the accepted path's entries only; the
draft's cache, as in the chain decoder, keeps the entries built from true features. A prompt-lookup proposal
(`lookup.py`) joins the tree as one more chain from the root, sharing the nodes it agrees with; it counts in
the `tokens` budget (kept whole, the tree's best nodes fill the rest).

Sampling with a tree needs multi-draft rejection (SpecInfer); only greedy is offered here.
"""

from __future__ import annotations

import math
from itertools import takewhile

import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers import DynamicCache

from llmcompress.speculative.decode import (DecodeStats, _check_prompt, _vocab, cache_len, cut_at_eos, finish, look_up,
                                            rollback)
from llmcompress.speculative.lookup import LookupConfig


class TreeConfig(BaseModel):
    """A draft tree per round (the `tree` fields of speculative evaluation); its depth is the evaluation's gamma."""

    model_config = ConfigDict(extra="forbid")
    topk: int = Field(4, ge=1, le=32, description="children proposed per expanded node, and nodes expanded per depth")
    tokens: int = Field(8, ge=1, le=256, description="draft tokens the target verifies per round: the best-scored "
                        "subtree and a looked-up chain, if any (on a CPU the verifying pass grows dearer beyond about 8)")
    stop: float = Field(0.0, ge=0, lt=1, description="stop growing the tree once no frontier node's path probability "
                        "under the draft reaches this (0: always the full depth)")


# ----------------------------------------------------------------------------- pure tree steps
def ancestor_mask(parents: list[int]) -> torch.Tensor:
    """[i, j]: node j is node i or one of its ancestors. parents[i] < i, or -1 (a child of the root).
    -> bool [N, N]"""
    n = len(parents)
    m = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise ValueError(f"node {i} has parent {p}: parents must come before their children")
        if p >= 0:
            m[i] |= m[p]
    return m


def select_subtree(scores: list[float], parents: list[int], n: int) -> list[int]:
    """The up to `n` best-scored nodes that form a subtree (each one's parent chosen, or the root), in index
    order. A child never outscores its parent (its score adds a log-probability); ties go to the lower index,
    which is the parent."""
    chosen: set[int] = set()
    for i in sorted(range(len(scores)), key=lambda i: (-scores[i], i)):
        if len(chosen) == n:
            break
        if parents[i] < 0 or parents[i] in chosen:
            chosen.add(i)
    return sorted(chosen)


def reindex(keep: list[int], parents: list[int]) -> list[int]:
    """The parents of the nodes `keep` (ascending, a subtree) as indices into `keep`."""
    at = {old: new for new, old in enumerate(keep)}
    return [at[parents[i]] if parents[i] >= 0 else -1 for i in keep]


def merge_chain(tokens: list[int], parents: list[int], chain: list[int]) -> list[int]:
    """Add `chain` (tokens following the root) to the tree in place, sharing the nodes it agrees with.
    -> the chain's node indices"""
    path, cur = [], -1
    for t in chain:
        nxt = next((i for i, (x, p) in enumerate(zip(tokens, parents)) if p == cur and x == t), None)
        if nxt is None:
            tokens.append(t)
            parents.append(cur)
            nxt = len(tokens) - 1
        path.append(nxt)
        cur = nxt
    return path


def subtree_with_chain(tokens: list[int], parents: list[int], scores: list[float], chain: list[int], n: int
                       ) -> tuple[list[int], list[int], list[int], list[int]]:
    """The draft tree cut to its best-scored subtree with `chain` (a looked-up proposal, cut to n tokens) merged in,
    n nodes in all at most: the chain is kept whole and the tree's best nodes fill the rest of the budget.
    -> (kept tree nodes, the merged tree's tokens and parents, the chain's node indices)"""
    chain = chain[:n]
    for budget in range(n, -1, -1):  # the chain shares some nodes with the tree: the largest subtree that fits
        keep = select_subtree(scores, parents, budget)
        toks, pars = [tokens[i] for i in keep], reindex(keep, parents)
        nodes = merge_chain(toks, pars, chain)
        if len(toks) <= n:
            return keep, toks, pars, nodes
    raise AssertionError("unreachable: the chain alone has at most n nodes")


def greedy_walk(tokens: list[int], parents: list[int], argmax: list[int]) -> tuple[list[int], int]:
    """Greedy verification of a tree. tokens, parents: the nodes (parent -1: the root, the last accepted
    token); argmax [N + 1]: the target's argmax after the root (entry 0) and after node i (entry i + 1).
    -> (the accepted path's node indices, the token after them)"""
    children: dict[int, dict[int, int]] = {}
    for i, (t, p) in enumerate(zip(tokens, parents)):
        children.setdefault(p, {}).setdefault(t, i)
    path, cur = [], -1
    while True:
        t = argmax[cur + 1]
        nxt = children.get(cur, {}).get(t)
        if nxt is None:
            return path, t
        path.append(nxt)
        cur = nxt


def keep_entries(cache: DynamicCache, base: int, keep: list[int]) -> None:
    """Keep the cache's first `base` positions and, of those after, the offsets `keep` (ascending)."""
    if keep == list(range(len(keep))):
        rollback(cache, base + len(keep))
        return
    idx = torch.tensor(keep, device=cache.layers[0].keys.device) + base
    for layer in cache.layers:  # move the kept entries forward in place (keep ascending: no entry is overwritten
        # before it is read, index_select copying first), then drop the rest
        layer.keys[..., base:base + len(keep), :] = layer.keys.index_select(-2, idx)
        layer.values[..., base:base + len(keep), :] = layer.values.index_select(-2, idx)
    rollback(cache, base + len(keep))


def _tree_block(past: int, anc: torch.Tensor) -> torch.Tensor:
    """Queries see the `past` cached positions and their tree ancestors `anc` [S, K]. -> bool [1, 1, S, past + K]"""
    return torch.cat([anc.new_ones(anc.shape[0], past), anc], 1)[None, None]


def depths(parents: list[int]) -> list[int]:
    """Each node's depth (a child of the root: 1)."""
    out: list[int] = []
    for p in parents:
        out.append(1 if p < 0 else out[p] + 1)
    return out


def target_tree_pass(target, root: int, tokens: list[int], parents: list[int], cache: DynamicCache
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One target pass over the root token and the tree's nodes after `cache` (which lacks the root): node i at
    position past + depth, seeing the cached context, the root and its ancestors. -> (features [1 + N, D],
    logits [1 + N, V]); the cache gains all 1 + N entries (`keep_entries` keeps the accepted ones)"""
    from llmcompress.speculative.feature_draft import _logits

    past = cache_len(cache)
    dev = next(target.parameters()).device
    ids = torch.tensor([[root] + tokens], device=dev)  # [1, 1 + N]
    anc = ancestor_mask([-1] + [p + 1 for p in parents])  # [1 + N, 1 + N]: the root is every node's ancestor
    pos = torch.tensor([[past] + [past + d for d in depths(parents)]], device=dev)
    out = target.model(ids, attention_mask=_tree_block(past, anc).to(dev), position_ids=pos, cache=cache,
                       use_cache=True)
    if not isinstance(out, tuple):
        raise ValueError("tree verification needs a target in llmcompress's model graph (llmcompress.models.load)")
    return out[0][0], _logits(target, out[0][0])


# ----------------------------------------------------------------------------- drafting
@torch.no_grad()
def draft_tree(draft, f_in: torch.Tensor, x_in: torch.Tensor, dcache: DynamicCache, depth: int, topk: int,
               stop_below: float = 0.0) -> dict:
    """Grow the draft's tree for one round. f_in [1, S, D], x_in [1, S]: the true pairs the draft cache lacks
    (its last position predicts the root's children). Expansion stops early once no frontier node's path
    probability reaches `stop_below`. -> {tokens, parents, scores: per node; logits: node -> the draft's
    logits [V] after it (-1: after the root)}"""
    h, logits = draft(f_in, x_in, dcache)
    base = cache_len(dcache)  # true entries; the root's children sit at position base
    lp = torch.log_softmax(logits[0, -1].float(), -1)
    top = lp.topk(topk)
    tokens, parents = top.indices.tolist(), [-1] * topk
    scores = top.values.tolist()
    feats = [h[0, -1]] * topk  # the feature each node is fed with: its parent's prediction
    node_logits = {-1: logits[0, -1]}
    frontier, fed = list(range(topk)), []  # fed: nodes whose entries follow the true ones in dcache, in order
    for d in range(2, depth + 1):
        if stop_below > 0 and max(scores[i] for i in frontier) < math.log(stop_below):
            break
        anc = ancestor_mask(parents)
        rows = anc[frontier][:, fed + frontier]  # [S, fed + S]: ancestors among the fed nodes, then themselves
        mask = _tree_block(base, rows).to(x_in.device)
        pos = torch.full((1, len(frontier)), base + d - 2, device=x_in.device)
        f = torch.stack([feats[i] for i in frontier])[None]  # [1, S, D]
        h, logits = draft(f, x_in.new_tensor([[tokens[i] for i in frontier]]), dcache, pos, mask)
        fed += frontier
        top = torch.log_softmax(logits[0].float(), -1).topk(topk, -1)  # [S, topk] per frontier node
        level = []
        for s, (u, ids, lps) in enumerate(zip(frontier, top.indices.tolist(), top.values.tolist())):
            node_logits[u] = logits[0, s]
            for t, v in zip(ids, lps):
                tokens.append(t)
                parents.append(u)
                scores.append(scores[u] + v)
                feats.append(h[0, s])
                level.append(len(tokens) - 1)
        frontier = sorted(sorted(level, key=lambda i: -scores[i])[:topk])
    return {"tokens": tokens, "parents": parents, "scores": scores, "logits": node_logits}


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def feature_tree_decode(target, draft, prompt: torch.Tensor, max_new_tokens: int, depth: int = 4,
                        tree: TreeConfig | None = None, eos_token_id: int | None = None,
                        lookup: LookupConfig | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """Greedy speculative decoding with a feature draft's tree of up to `depth` levels per round (module doc).
    prompt: [1, P] -> ([1, P + new], stats). Stats: drafted counts the verified nodes, accepted the path;
    alpha the draft's top-1 agreement at the root and the path's nodes it expanded."""
    from llmcompress.speculative.feature_draft import decoding, start_features

    _check_prompt(prompt)
    if depth < 1:
        raise ValueError(f"tree depth (gamma) {depth} must be >= 1")
    tree = tree or TreeConfig()
    seq = prompt.to(next(target.parameters()).device)
    end = seq.shape[1] + max_new_tokens
    tcache, dcache = DynamicCache(), DynamicCache()
    stats = DecodeStats(gamma=depth)
    seq, feats = start_features(target, seq, tcache, stats)
    fed, history = 0, seq[0].tolist()
    while decoding(seq, prompt.shape[1], end, eos_token_id):
        n = seq.shape[1] - 1  # index of the last token (the root); feats covers 0..n-1, tcache holds n entries
        g = draft_tree(draft, feats[fed:n][None], seq[:, fed + 1:n + 1], dcache, depth, tree.topk, tree.stop)
        looked, _ = look_up(history, lookup, min(end - seq.shape[1], tree.tokens), _vocab(target), seq.device, 0.0)
        keep, tokens, parents, chain = subtree_with_chain(g["tokens"], g["parents"], g["scores"], looked, tree.tokens)
        logits = {j: g["logits"][i] for j, i in enumerate(keep) if i in g["logits"]} | {-1: g["logits"][-1]}
        fv, pl = target_tree_pass(target, int(seq[0, -1]), tokens, parents, tcache)  # [1 + N, D], [1 + N, V]
        argmax = pl.argmax(-1).tolist()
        path, nxt = greedy_walk(tokens, parents, argmax)
        _count(stats, argmax, logits, path, len(tokens), max(depths(parents), default=0), looked, chain)
        new = [tokens[i] for i in path] + [nxt]
        keep_entries(tcache, n, [0] + [i + 1 for i in path])
        feats = torch.cat([feats, fv[[0] + [i + 1 for i in path]]])
        seq = torch.cat([seq, seq.new_tensor([new])], 1)
        history += new
        rollback(dcache, n)  # keep the entries built from true features
        fed = n
        seq, stop = cut_at_eos(seq, new, eos_token_id)
        if stop:
            break
    return finish(seq, prompt.shape[1], end, stats)


def _count(stats: DecodeStats, argmax: list[int], draft_logits: dict, path: list[int], n_nodes: int, deepest: int,
           looked: list[int], chain: list[int]) -> None:
    """One tree round into `stats` (argmax: the target's after the root and each node). alpha's integrand, the
    draft's top-1 agreement with the target, at the root and each path node up to the first disagreement, where
    the draft expanded that node."""
    for i in [-1] + path:
        if i not in draft_logits:
            break
        agree = int(draft_logits[i].argmax()) == argmax[i + 1]
        stats.overlap_sum += float(agree)
        stats.overlap_count += 1
        if not agree:
            break
    stats.drafted += n_nodes
    stats.accepted += len(path)
    if looked:
        stats.lookup_rounds += 1
        stats.lookup_proposed += len(looked)
        stats.lookup_accepted += len(list(takewhile(lambda ab: ab[0] == ab[1], zip(path, chain))))
    stats.target_calls += 1
    stats.accepted_per_call.append(len(path))
    stats.drafted_per_call.append(deepest)
    stats.looked_up_per_call.append(False)


__all__ = ["TreeConfig", "ancestor_mask", "draft_tree", "feature_tree_decode", "greedy_walk", "keep_entries",
           "merge_chain", "reindex", "select_subtree", "subtree_with_chain"]
