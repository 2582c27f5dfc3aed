"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023), batch 1, with KV caches for both models.

One round: the draft proposes `gamma` tokens one at a time (its own KV cache); the target scores all of
them in ONE forward pass (its KV cache); draft token i is kept with probability min(1, p_i(x) / q_i(x));
at the first rejection a token is drawn from norm(max(0, p_i - q_i)) instead, and when every draft token
is kept a bonus token is drawn from the target's next distribution. Each round yields 1..gamma+1 tokens
distributed exactly as target-only sampling. Greedy mode (temperature 0) keeps a draft token iff it is
the target's argmax and replaces the first mismatch by that argmax, so the output is the target's greedy
output token for token.

Cache invariant: each cache holds the keys/values of every token of `seq` but the last few; a forward
feeds `seq[:, cache_len:]`. After verification the target cache is cropped back to the accepted prefix
(rejected draft tokens leave no trace); the draft cache likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from llmcompress.speculative.divergences import acceptance
from llmcompress.speculative.lookup import LookupConfig, lookup_proposal


@dataclass
class DecodeStats:
    """Counters of one or more decodes. `accepted_per_call[i]`: draft tokens kept at target call i."""

    gamma: int = 0
    target_calls: int = 0  # verification passes (the prompt's prefill is not counted)
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    accepted_per_call: list[int] = field(default_factory=list)
    drafted_per_call: list[int] = field(default_factory=list)  # < gamma where drafting stopped early
    overlap_sum: float = 0.0  # sum over verified positions of sum_x min(p(x), q(x))
    overlap_count: int = 0
    # rounds whose proposal was looked up in the context (`lookup`), not drafted; drafted, accepted and alpha
    # count the draft model's rounds alone, tau every round
    lookup_rounds: int = 0
    lookup_proposed: int = 0
    lookup_accepted: int = 0
    looked_up_per_call: list[bool] = field(default_factory=list)

    @property
    def alpha(self) -> float:
        """Estimated acceptance rate E[sum min(p, q)] over the prefixes on the decoded path."""
        return self.overlap_sum / max(self.overlap_count, 1)

    @property
    def tau(self) -> float:
        """Block efficiency: tokens produced per target call (before truncation to max_new_tokens)."""
        return (sum(self.accepted_per_call) + len(self.accepted_per_call)) / max(self.target_calls, 1)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens kept."""
        return self.accepted / max(self.drafted, 1)

    @property
    def acceptance_by_position(self) -> list[float]:
        """Entry k: of the target calls that drafted token k + 1 and kept tokens 1..k, the fraction that kept token
        k + 1 too (conditional acceptance per draft position; a draft that drifts on its own proposals falls off)."""
        n = self.accepted_per_call
        d = self.drafted_per_call if len(self.drafted_per_call) == len(n) else [self.gamma] * len(n)
        if len(self.looked_up_per_call) == len(n):  # the draft model's rounds alone
            rounds = [(a, m) for a, m, lk in zip(n, d, self.looked_up_per_call) if not lk]
            n, d = [a for a, _ in rounds], [m for _, m in rounds]
            if self.lookup_rounds and not any(d):  # no draft model's round at all (prompt lookup alone)
                return []
        out = []
        for k in range(self.gamma):
            reached = [a for a, m in zip(n, d) if a >= k and m > k]
            out.append(sum(a > k for a in reached) / len(reached) if reached else 0.0)
        return out

    def merge(self, other: "DecodeStats") -> "DecodeStats":
        return DecodeStats(self.gamma or other.gamma, self.target_calls + other.target_calls,
                           self.drafted + other.drafted, self.accepted + other.accepted,
                           self.new_tokens + other.new_tokens, self.accepted_per_call + other.accepted_per_call,
                           self.drafted_per_call + other.drafted_per_call, self.overlap_sum + other.overlap_sum,
                           self.overlap_count + other.overlap_count, self.lookup_rounds + other.lookup_rounds,
                           self.lookup_proposed + other.lookup_proposed, self.lookup_accepted + other.lookup_accepted,
                           self.looked_up_per_call + other.looked_up_per_call)

    def as_dict(self) -> dict:
        return {"gamma": self.gamma, "target_calls": self.target_calls, "drafted": self.drafted,
                "accepted": self.accepted, "new_tokens": self.new_tokens, "alpha": self.alpha, "tau": self.tau,
                "acceptance_rate": self.acceptance_rate, "acceptance_by_position": self.acceptance_by_position,
                "lookup_rounds": self.lookup_rounds, "lookup_proposed": self.lookup_proposed,
                "lookup_accepted": self.lookup_accepted}


# ----------------------------------------------------------------------------- pure sampling steps
def probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next-token distribution [..., V]; temperature 0 gives the one-hot argmax."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return torch.softmax(logits.float() / temperature, -1)


def sample(p: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One token from distribution p [V]."""
    return int(torch.multinomial(p, 1, generator=generator))


def keep_drafting(q_logits: torch.Tensor, q: torch.Tensor, token: int, temperature: float, stop_below: float) -> bool:
    """Whether the draft proposes another token after `token`: its probability under the draft (the sampling
    distribution q; greedy: softmax(q_logits)) is at least `stop_below` (0: always; a dynamic draft length in
    the spirit of EAGLE-2's confidence and SpecDec++). The rule reads the draft alone, so decoding stays exact.
    q_logits, q: [V]"""
    if stop_below <= 0:
        return True
    conf = torch.softmax(q_logits.float(), -1)[token] if temperature == 0 else q[token]
    return float(conf) >= stop_below


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) [V]: where the target's mass exceeds the draft's (p itself if p == q)."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p


def verify(draft_tokens: list[int], q: torch.Tensor | None, p: torch.Tensor, greedy: bool,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """Accept a prefix of the draft and pick the next token.

    draft_tokens: gamma tokens; q: [gamma, V] draft distributions they were drawn from (greedy: unused, may be
    None); p: [gamma+1, V]
    target distributions at the same positions plus one. -> (number accepted n, the token after them).
    """
    for i, x in enumerate(draft_tokens):
        if greedy:
            ok = int(p[i].argmax()) == x
        else:
            r = float(torch.rand((), generator=generator))
            ok = r * float(q[i, x]) < float(p[i, x])  # r < p/q, without dividing by q
        if not ok:
            return i, int(p[i].argmax()) if greedy else sample(residual(p[i], q[i]), generator)
    n = len(draft_tokens)
    return n, int(p[n].argmax()) if greedy else sample(p[n], generator)


def verify_round(drafted: list[int], qs: list[torch.Tensor], qls: list[torch.Tensor], pl: torch.Tensor,
                 temperature: float, generator: torch.Generator | None, stats: DecodeStats,
                 looked_up: bool = False) -> tuple[int, int]:
    """One verification: `verify` on the proposals' q [k] x [V] and the target's logits pl [k + 1, V], and the
    round counted into `stats` (a draft model's round: the alpha integrand over the accepted positions and the
    first rejected one; `looked_up`: the lookup counters). k = 0: a plain target step. -> (accepted, next token)"""
    k = len(drafted)
    if k == 0:
        p = probs(pl[-1], temperature)
        n, nxt = 0, int(p.argmax()) if temperature == 0 else sample(p, generator)
    else:  # greedy looked-up proposals come without q: greedy verification reads p alone
        n, nxt = verify(drafted, torch.stack(qs) if qs else None, probs(pl, temperature), temperature == 0, generator)
    if looked_up:
        stats.lookup_rounds += 1
        stats.lookup_proposed += k
        stats.lookup_accepted += n
    elif k:
        m = min(n + 1, k)
        stats.overlap_sum += float(acceptance(pl[:m], torch.stack(qls[:m]), temperature).sum())
        stats.overlap_count += m
        stats.drafted += k
        stats.accepted += n
    stats.target_calls += 1
    stats.accepted_per_call.append(n)
    stats.drafted_per_call.append(k)
    stats.looked_up_per_call.append(looked_up)
    return n, nxt


def look_up(history: list[int], lookup: LookupConfig | None, room: int, vocab: int, device, temperature: float
            ) -> tuple[list[int], list[torch.Tensor]]:
    """A proposal from the context (`lookup.lookup_proposal`), at most `room` tokens, as a draft whose
    distribution is one-hot on each token. -> (tokens, q [V] each: only sampling reads q, so greedy gets none);
    empty without `lookup` or a match"""
    if lookup is None or room < 1:
        return [], []
    toks = lookup_proposal(history, lookup.max_ngram, lookup.min_ngram, min(lookup.tokens, room))
    if temperature == 0:
        return toks, []
    return toks, [torch.nn.functional.one_hot(torch.tensor(t, device=device), vocab).float() for t in toks]


def cut_at_eos(seq: torch.Tensor, new: list[int], eos_token_id: int | None) -> tuple[torch.Tensor, bool]:
    """`seq` [1, L] ends with this round's `new` tokens: cut it after the first EOS among them.
    -> (seq, whether decoding ends)"""
    if eos_token_id is not None and eos_token_id in new:
        return seq[:, : seq.shape[1] - len(new) + new.index(eos_token_id) + 1], True
    return seq, False


def finish(seq: torch.Tensor, prompt_len: int, end: int, stats: DecodeStats) -> tuple[torch.Tensor, DecodeStats]:
    """A decoder's result: `seq` [1, L] cut to `end` tokens (a round may overshoot), its new tokens counted."""
    seq = seq[:, :end]
    stats.new_tokens = seq.shape[1] - prompt_len
    return seq, stats


# ----------------------------------------------------------------------------- caches
def cache_len(cache: DynamicCache) -> int:
    return cache.get_seq_length() if len(cache.layers) else 0


def rollback(cache: DynamicCache, length: int) -> None:
    """Drop cached positions beyond `length` (transformers 5: crop(-n) removes the last n)."""
    extra = cache_len(cache) - length
    if extra > 0:
        cache.crop(-extra)


def feed(model, seq: torch.Tensor, cache: DynamicCache, extra: torch.Tensor | None = None) -> torch.Tensor:
    """Feed the tokens of `seq` [1, L] the cache lacks (then `extra` [1, k]); -> logits of those tokens [n, V]."""
    x = seq[:, cache_len(cache):]
    if extra is not None:
        x = torch.cat([x, extra], 1)
    return model(x, cache=cache, use_cache=True).logits[0]


def prefill(model, prompt: torch.Tensor) -> DynamicCache:
    """Cache of every prompt token but the last (the first decode step feeds it)."""
    cache = DynamicCache()
    if prompt.shape[1] > 1:
        model(prompt[:, :-1], cache=cache, use_cache=True)
    return cache


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


# ----------------------------------------------------------------------------- decoders
@torch.no_grad()
def target_decode(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                  generator: torch.Generator | None = None, eos_token_id: int | None = None
                  ) -> tuple[torch.Tensor, DecodeStats]:
    """Plain autoregressive decoding with a KV cache (the baseline). prompt: [1, P] -> [1, P + new]."""
    _check_prompt(prompt)
    seq = prompt.to(_device(model))
    cache = prefill(model, seq)
    stats = DecodeStats()
    for _ in range(max_new_tokens):
        logits = feed(model, seq, cache)[-1]
        tok = int(logits.argmax()) if temperature == 0 else sample(probs(logits, temperature), generator)
        seq = torch.cat([seq, seq.new_tensor([[tok]])], 1)
        stats.target_calls += 1
        stats.accepted_per_call.append(0)
        stats.new_tokens += 1
        if tok == eos_token_id:
            break
    return seq, stats


@torch.no_grad()
def speculative_decode(target, draft, prompt: torch.Tensor, max_new_tokens: int, gamma: int = 4,
                       temperature: float = 0.0, generator: torch.Generator | None = None,
                       eos_token_id: int | None = None, stop_below: float = 0.0,
                       lookup: LookupConfig | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """Speculative sampling from `target` with proposals by `draft`. prompt: [1, P] -> ([1, P + new], stats).

    temperature 0: greedy (output = the target's greedy output); > 0: sampling, distributed as the
    target's samples at that temperature. `generator` seeds every random draw. A round drafts up to `gamma`
    tokens, fewer when one's draft probability falls below `stop_below` (`keep_drafting`). With `lookup`, a
    round whose context holds a match proposes the looked-up tokens instead (`lookup.py`); `draft` None: lookup
    alone, a plain target step where nothing matches.
    """
    _check_prompt(prompt)
    if gamma < 1:
        raise ValueError(f"gamma={gamma} must be >= 1")
    if draft is None and lookup is None:
        raise ValueError("speculative decoding needs a draft model, a lookup (LookupConfig) or both")
    greedy = temperature == 0
    seq = prompt.to(_device(target))
    end = seq.shape[1] + max_new_tokens
    tcache = prefill(target, seq)
    dcache = prefill(draft, seq) if draft is not None else None
    history = seq[0].tolist()
    stats = DecodeStats(gamma=gamma)
    while seq.shape[1] < end:
        drafted, qs = look_up(history, lookup, end - seq.shape[1], _vocab(target), seq.device, temperature)
        qls, looked_up, d_seq = [], bool(drafted), seq  # a looked-up round has no logits: alpha leaves it out
        for _ in range(gamma if draft is not None and not looked_up else 0):
            ql = feed(draft, d_seq, dcache)[-1]  # draft gamma tokens: q [V] each, ql the draft's logits
            q = probs(ql, temperature)
            tok = int(q.argmax()) if greedy else sample(q, generator)
            drafted.append(tok)
            qs.append(q)
            qls.append(ql)
            d_seq = torch.cat([d_seq, d_seq.new_tensor([[tok]])], 1)
            if not keep_drafting(ql, q, tok, temperature, stop_below):
                break
        # verify all of them in one target pass: logits [k + 1, V] at the last seq token and each of the k proposed
        pl = feed(target, seq, tcache, seq.new_tensor([drafted]) if drafted else None)[-(len(drafted) + 1):]
        n, nxt = verify_round(drafted, qs, qls, pl, temperature, generator, stats, looked_up)
        new = drafted[:n] + [nxt]
        seq = torch.cat([seq, seq.new_tensor([new])], 1)
        history += new
        # roll back: both caches keep at most seq[:, :-1] (the draft may lack the last accepted token)
        rollback(tcache, seq.shape[1] - 1)
        if dcache is not None:
            rollback(dcache, seq.shape[1] - 1)
        seq, stop = cut_at_eos(seq, new, eos_token_id)
        if stop:
            break
    return finish(seq, prompt.shape[1], end, stats)


@torch.no_grad()
def hf_assisted_decode(target, draft, prompt: torch.Tensor, max_new_tokens: int, gamma: int = 4,
                       temperature: float = 0.0, eos_token_id: int | None = None) -> torch.Tensor:
    """The same job through transformers' `generate(assistant_model=...)` (constant gamma), for comparison."""
    _check_prompt(prompt)
    prompt = prompt.to(_device(target))
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    pad = eos_token_id if eos_token_id is not None else 0
    return target.generate(prompt, attention_mask=torch.ones_like(prompt), assistant_model=draft,
                           num_assistant_tokens=gamma, num_assistant_tokens_schedule="constant",
                           max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad, **kw)


@torch.no_grad()
def hf_prompt_lookup_decode(target, prompt: torch.Tensor, max_new_tokens: int, lookup: LookupConfig,
                            eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy prompt lookup decoding through transformers' `generate(prompt_lookup_num_tokens=...)` (the peer of
    lookup alone). It matches suffixes of `lookup.max_ngram` tokens down to 1 and proposes `lookup.tokens`."""
    _check_prompt(prompt)
    prompt = prompt.to(_device(target))
    pad = eos_token_id if eos_token_id is not None else 0
    return target.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           prompt_lookup_num_tokens=lookup.tokens, max_matching_ngram_size=lookup.max_ngram,
                           max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad)


def _check_prompt(prompt: torch.Tensor) -> None:
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be one non-empty sequence of shape [1, P], got {tuple(prompt.shape)}")


__all__ = ["DecodeStats", "cut_at_eos", "finish", "hf_assisted_decode", "hf_prompt_lookup_decode", "keep_drafting",
           "look_up", "probs", "residual", "rollback", "sample", "speculative_decode", "target_decode", "verify",
           "verify_round"]
