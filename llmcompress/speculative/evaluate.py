"""Measure a draft for speculative decoding: alpha, tau, cost ratio c, predicted and measured speed-up.

Protocol (batch 1, greedy unless `temperature` > 0): every prompt is decoded by the target alone (our KV
cache loop) and, right after, by speculative decoding at each gamma; wall-clock time covers the whole
decode, prompt prefill included, summed over prompts. c is the median time of one cached single-token
draft step over one target step at the first prompt's length, the two models' steps alternating. Predicted speed-up uses the measured alpha and c in Leviathan
et al.'s formula; "identical" says whether every speculative output equals the target-only output.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmcompress.models.cpu_linear import CpuLinear, packed_linears, resolve
from llmcompress.speculative import metrics
from llmcompress.speculative.decode import (DecodeStats, feed, hf_assisted_decode, hf_prompt_lookup_decode, prefill,
                                            speculative_decode, target_decode)
from llmcompress.speculative.lookup import LookupConfig
from llmcompress.speculative.tree import TreeConfig


class SpecEvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gammas: list[int] = Field(default_factory=lambda: [1, 2, 4], description="draft tokens per target call")
    prompts: int = Field(4, gt=0, description="held-out prompts to decode")
    new_tokens: int = Field(32, gt=0, description="tokens generated per prompt")
    prompt_tokens: int = Field(64, gt=0, description="prompts are cut to at most this many tokens")
    temperature: float = Field(0.0, ge=0, description="0: greedy; > 0: speculative sampling")
    seed: int = 0
    cost_steps: int = Field(16, gt=0, description="decode steps timed per model for the cost ratio c")
    compare_hf: bool = Field(False, description="also time transformers' generate(assistant_model=...) per gamma "
                             "(with no draft model: its prompt lookup, generate(prompt_lookup_num_tokens=...))")
    draft_vocab: int | None = Field(None, gt=0, description="restrict the draft's LM head to the N most frequent "
                                    "ids of the training text (plus special tokens): a cheaper draft, still lossless")
    draft_stop: float = Field(0.0, ge=0, lt=1, description="stop a round's drafting once a proposal's draft "
                              "probability is below this (0: always gamma tokens; lossless either way)")
    cpu_linear: CpuLinear = Field("auto", description="how float32 CPU linears run while decoding: onednn (weights "
                                  "reordered once; verifying gamma + 1 tokens costs about one decode step), torch "
                                  "(F.linear, MKL), auto (onednn where it runs)")
    lookup: LookupConfig | None = Field(None, description="propose tokens looked up in the context where it holds "
                                        "a match (prompt lookup), the draft model elsewhere; lossless either way")
    tree: TreeConfig | None = Field(None, description="a feature draft grows a tree per round, gamma levels deep, "
                                    "and the target verifies its best `tokens` nodes in one pass (greedy only)")

    @field_validator("gammas")
    @classmethod
    def _positive(cls, v):
        if not v or any(g < 1 for g in v):
            raise ValueError("gammas must be a non-empty list of integers >= 1")
        return v


def parse_gammas(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]."""
    try:
        gammas = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise ValueError(f"--gammas {text!r} must be comma-separated integers, e.g. 1,2,4") from None
    if not gammas or min(gammas) < 1:
        raise ValueError(f"--gammas {text!r} must list integers >= 1")
    return gammas


def prompts_from_texts(tokenizer, texts: list[str], n: int, max_tokens: int) -> list[torch.Tensor]:
    """The first `n` non-empty texts as prompts of at most `max_tokens` tokens each. -> n x [1, P]"""
    prompts = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            prompts.append(torch.tensor([ids]))
        if len(prompts) == n:
            break
    if not prompts:
        raise ValueError("no prompts: the held-out texts are empty; give data with held-out rows")
    return prompts


def instruction_prompts(tokenizer, texts: list[str], n: int, prompt_tokens: int,
                        instruction: str = "Summarise: ", per_doc: int = 1) -> torch.Tensor:
    """Chat prompts asking `instruction` + document, each exactly `prompt_tokens` tokens long: the chat
    template's tokens around the document's first tokens (documents too short are skipped). per_doc > 1
    also frames the document's next consecutive pieces of the same length (more distinct training prompts).
    -> [min(n, usable), prompt_tokens]"""
    if per_doc < 1:
        raise ValueError(f"per_doc={per_doc} must be >= 1")
    mark = "\u2063DOCUMENT\u2063"
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruction + mark}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = text.split(mark)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, tail = enc(before), enc(after)
    room = prompt_tokens - len(head) - len(tail)
    if room < 16:
        raise ValueError(f"prompt_tokens={prompt_tokens} leaves {room} tokens for the document: the chat frame "
                         f"takes {len(head) + len(tail)}; use at least {len(head) + len(tail) + 16}")
    rows = []
    for ids in map(enc, texts):
        rows += [head + ids[j * room:(j + 1) * room] + tail for j in range(min(per_doc, len(ids) // room))]
        if len(rows) >= n:
            break
    rows = rows[:n]
    if not rows:
        raise ValueError(f"no document has the {room} tokens that {prompt_tokens}-token prompts need; "
                         "lower prompt_tokens")
    return torch.tensor(rows)


@torch.no_grad()
def cost_ratio(draft, target, prompt: torch.Tensor, steps: int) -> float:
    """c: median time of a cached single-token draft step / the same for the target, after `prompt` [1, P].
    The two models' steps alternate, so a change of machine load affects both alike. A feature draft's step
    reads a feature and a token (`feature_draft.feature_step_cost`)."""
    from llmcompress.speculative.feature_draft import feature_step_cost, is_feature_draft

    if is_feature_draft(draft):
        d, t = feature_step_cost(draft, target, prompt, steps)
        return statistics.median(d) / statistics.median(t)
    seq = prompt.to(next(target.parameters()).device)
    caches, toks, times = {}, {}, {"draft": [], "target": []}
    for name, model in (("draft", draft), ("target", target)):
        caches[name] = prefill(model, seq)
        toks[name] = feed(model, seq, caches[name])[-1:].argmax(-1, keepdim=True)  # [1, 1]; warm-up
    for _ in range(steps):
        for name, model in (("draft", draft), ("target", target)):
            _, dt = _timed(lambda: model(toks[name], cache=caches[name], use_cache=True), seq.device)
            times[name].append(dt)
    return statistics.median(times["draft"]) / statistics.median(times["target"])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def evaluate_speculative(target, draft, prompts: list[torch.Tensor], cfg: SpecEvalConfig,
                         progress: Callable[[str, int, int], None] | None = None) -> dict:
    """The report of the module doc for `draft` proposing to `target` on `prompts` (each [1, P]); with
    `cfg.lookup`, looked-up proposals where the context matches (draft None: lookup alone, c = 0, one row).

    Per prompt, target-only decoding and each gamma run back to back, so slow drifts of machine load
    affect all of them alike. Both models decode through the same linears (`cfg.cpu_linear`)."""
    from llmcompress.speculative.draft_init import check_compatible
    from llmcompress.speculative.feature_draft import is_feature_draft

    if draft is None and cfg.lookup is None:
        raise ValueError("nothing proposes tokens: give a draft model, a lookup (--lookup N), or both")
    if draft is not None:
        check_compatible(target, draft)
    if draft is not None and cfg.lookup is not None and cfg.compare_hf:
        raise ValueError("transformers runs a draft model or prompt lookup, not both; leave out compare_hf, or "
                         "measure the lookup alone (no draft) against its prompt lookup")
    if draft is None and cfg.compare_hf and cfg.temperature > 0:
        raise ValueError("the comparison with transformers' prompt lookup is greedy; leave out compare_hf, or set "
                         "temperature 0")
    if cfg.tree is not None and not is_feature_draft(draft):
        raise ValueError("tree verification grows a feature draft's tree; give a feature draft (feature:K), or leave "
                         "out tree")
    if cfg.tree is not None and cfg.temperature > 0:
        raise ValueError("tree verification is greedy (sampling from a tree needs multi-draft rejection); set "
                         "temperature 0, or leave out tree")
    if is_feature_draft(draft) and cfg.compare_hf:
        raise ValueError("transformers' assisted generation cannot run a feature draft (it reads the target's "
                         "features); leave out compare_hf")
    packed = resolve(cfg.cpu_linear, next(target.parameters()).device)
    with torch.no_grad(), packed_linears(*[m for m in (target, draft) if m is not None], enabled=packed):
        report = _evaluate(target, draft, prompts, cfg, progress)
    how = "oneDNN, weights reordered once" if packed else "F.linear"
    return report | {"cpu_linear": "onednn" if packed else "torch",
                     "protocol": report["protocol"] + f"; both models' linears: {how}"}


def _evaluate(target, draft, prompts: list[torch.Tensor], cfg: SpecEvalConfig,
              progress: Callable[[str, int, int], None] | None) -> dict:
    from llmcompress.speculative.feature_draft import feature_speculative_decode, is_feature_draft
    from llmcompress.speculative.tree import feature_tree_decode

    feature = is_feature_draft(draft)

    def tree_decode(target, draft, prompt, new_tokens, gamma, temperature=0.0, generator=None, eos=None, stop=0.0,
                    lookup=None):  # greedy: temperature and generator are unused; the tree has its own stop
        return feature_tree_decode(target, draft, prompt, new_tokens, gamma, cfg.tree, eos, lookup)

    decode = tree_decode if cfg.tree is not None else feature_speculative_decode if feature else speculative_decode
    target.eval()
    if draft is not None:
        draft.eval()
    device = next(target.parameters()).device
    eos = getattr(getattr(target, "tokenizer", None), "eos_token_id", None)
    prompts = [p[:, : cfg.prompt_tokens] for p in prompts[: cfg.prompts]]
    gammas = cfg.gammas if draft is not None else [cfg.lookup.tokens]  # lookup alone: its tokens per round
    runs = 1 + len(gammas) * (2 if cfg.compare_hf else 1)

    def gen(i):
        return torch.Generator(device="cpu").manual_seed(cfg.seed + i)

    def hf(p, gamma):
        if draft is None:
            return hf_prompt_lookup_decode(target, p, cfg.new_tokens, cfg.lookup, eos)
        return hf_assisted_decode(target, draft, p, cfg.new_tokens, gamma, cfg.temperature, eos)

    target_decode(target, prompts[0], 2)  # warm-up (allocator, kernels)
    decode(target, draft, prompts[0], 2, gamma=1, lookup=cfg.lookup)
    c = cost_ratio(draft, target, prompts[0], cfg.cost_steps) if draft is not None else 0.0
    base_time, new_tokens = 0.0, 0
    spec = {g: {"stats": DecodeStats(gamma=g), "seconds": 0.0, "identical": True, "hf_seconds": 0.0,
                "hf_identical": True} for g in gammas}
    for i, p in enumerate(prompts):
        (ref, _), dt = _timed(lambda: target_decode(target, p, cfg.new_tokens, cfg.temperature, gen(i), eos), device)
        base_time += dt
        new_tokens += ref.shape[1] - p.shape[1]
        for gamma, r in spec.items():
            (out, st), dt = _timed(lambda: decode(target, draft, p, cfg.new_tokens, gamma, cfg.temperature, gen(i),
                                                  eos, cfg.draft_stop, cfg.lookup), device)
            r["stats"], r["seconds"] = r["stats"].merge(st), r["seconds"] + dt
            r["identical"] &= torch.equal(out, ref)
            if cfg.compare_hf:
                out, dt = _timed(lambda: hf(p, gamma), device)
                r["hf_seconds"] += dt
                r["hf_identical"] &= torch.equal(out, ref)
        if progress:
            progress("speculative decoding", (i + 1) * runs, len(prompts) * runs)
    rows = []
    greedy = cfg.temperature == 0  # sampling: outputs agree in law only, not token for token
    for gamma, r in spec.items():
        alpha = min(max(r["stats"].alpha, 0.0), 1.0)
        tree = cfg.tree is not None  # Leviathan's formulas model a chain: a tree's prediction reads its measured tau
        rows.append(r["stats"].as_dict() | {
            # ... and a draft model's rounds; lookup alone has none
            "expected_tau": metrics.expected_tokens(alpha, gamma) if draft is not None and not tree else None,
            "predicted_speedup": (r["stats"].tau / (gamma * c + 1) if tree else metrics.speedup(alpha, gamma, c))
            if draft is not None else None,
            "measured_speedup": base_time / r["seconds"],
            "seconds": r["seconds"],
            "identical_output": r["identical"] if greedy else None,
        })
        if cfg.compare_hf:
            rows[-1] |= {"hf_seconds": r["hf_seconds"], "hf_measured_speedup": base_time / r["hf_seconds"],
                         "hf_identical_output": r["hf_identical"] if greedy else None}
    alpha = sum(r["alpha"] for r in rows) / len(rows)
    head = draft.get_output_embeddings() if draft is not None else None
    return {
        "draft_kind": "none" if draft is None else "feature" if feature else "model",
        "draft_layers": len(draft.model.layers) if draft is not None else 0,
        "draft_vocab": int(head.weight.shape[0]) if head is not None else 0,
        "target_layers": len(target.model.layers),
        "lookup": cfg.lookup.model_dump() if cfg.lookup else None,
        "tree": cfg.tree.model_dump() if cfg.tree else None,
        "prompts": len(prompts),
        "new_tokens_per_prompt": cfg.new_tokens,
        "temperature": cfg.temperature,
        "cost_ratio_c": c,
        "target_seconds": base_time,
        "target_tok_s": new_tokens / base_time,
        "alpha": alpha,
        "optimal_gamma_predicted": metrics.optimal_gamma(alpha, c) if draft is not None else None,
        "gammas": rows,
        "threads": torch.get_num_threads(),
        "draft_stop": cfg.draft_stop,
        "protocol": (f"batch 1, {'greedy' if greedy else f'temperature {cfg.temperature}'}, "
                     f"{len(prompts)} held-out prompts of <= {cfg.prompt_tokens} tokens, {cfg.new_tokens} new tokens "
                     "each, target alone and every gamma back to back per prompt; wall-clock includes prefill; "
                     "c = median cached decode-step time draft/target (alternating); alpha = mean sum min(p, q) "
                     "(greedy: argmax agreement) on the decoded path; kept by position k = the fraction of calls "
                     "keeping draft token k among those that drafted it and kept tokens 1..k-1"
                     + (f"; a round drafts up to gamma tokens, stopping after one whose draft probability is below "
                        f"{cfg.draft_stop}" if cfg.draft_stop else "")
                     + (f"; a round whose last {cfg.lookup.min_ngram}-{cfg.lookup.max_ngram} tokens occurred earlier "
                        f"in the sequence proposes the up to {cfg.lookup.tokens} tokens that followed the latest "
                        "occurrence instead (prompt lookup; alpha, c and kept by position are the draft model's "
                        "rounds alone, tau counts every round)" if cfg.lookup else "")
                     + (_tree_protocol(cfg.tree) if cfg.tree else "")),
    }


def _tree_protocol(tree: TreeConfig) -> str:
    return (f"; tree verification: each round the draft grows a tree gamma levels deep (the {tree.topk} best children "
            f"of the {tree.topk} best-scored nodes per level), the target verifies its {tree.tokens} best-scored nodes "
            "in one tree-masked pass (alpha: the draft's top-1 agreement at the root and the accepted path's expanded "
            "nodes; " + (f"the tree stops growing once no frontier path's draft probability reaches {tree.stop}; "
                         if tree.stop else "") + "predicted speed-up = tau / (gamma c + 1))")


def evaluate_draft(target, draft_spec: str | None, corpus, cfg: SpecEvalConfig,
                   progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Build the draft `draft_spec` (a model, or layers:K / important:K of `target`; None: `cfg.lookup` alone)
    and measure it on the first held-out documents of `corpus` (a `llmcompress.data.Corpus`) as prompts."""
    from llmcompress.speculative.draft_init import init_draft

    if getattr(target, "tokenizer", None) is None:
        raise ValueError("speculative evaluation needs the target's tokenizer; the model folder has none")
    if draft_spec is None and cfg.draft_vocab:
        raise ValueError("--draft-vocab restricts a draft model's head; give --draft, or leave it out")
    from llmcompress.speculative.vocab import frequent_tokens, restrict_vocab, special_ids, token_counts

    calib = corpus.train_batches(8, 128) if (draft_spec or "").startswith(("important:", "feature:")) else None
    draft = init_draft(target, draft_spec, calib) if draft_spec is not None else None
    if cfg.draft_vocab:
        from llmcompress.data import token_stream
        from llmcompress.speculative.vocab import SubsetHead

        if isinstance(draft.get_output_embeddings(), SubsetHead):
            raise ValueError(f"draft {draft_spec} already carries a vocabulary of "
                             f"{draft.get_output_embeddings().weight.shape[0]} ids (draft_vocab.json); "
                             "leave out --draft-vocab, or remove that file to choose another size")

        counts = token_counts(token_stream(target.tokenizer, corpus.train_texts), target.config.vocab_size)
        restrict_vocab(draft, frequent_tokens(counts, cfg.draft_vocab, special_ids(target.tokenizer)))
    prompts = prompts_from_texts(target.tokenizer, corpus.heldout_texts, cfg.prompts, cfg.prompt_tokens)
    report = evaluate_speculative(target, draft, prompts, cfg, progress)
    return {"draft": draft_spec, "draft_init_layers": getattr(draft, "init_layers", None)} | report


__all__ = ["SpecEvalConfig", "cost_ratio", "instruction_prompts", "evaluate_draft", "evaluate_speculative", "parse_gammas",
           "prompts_from_texts"]
