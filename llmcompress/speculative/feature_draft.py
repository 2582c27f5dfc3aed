"""A draft that reads the target's features (EAGLE, Li et al. 2024), trained with DistillSpec's online loss.

A layer-subset draft has to rebuild from tokens alone what the target computed; this draft instead reads the
target's own features. At position t it takes fc([f_t ; e(x_{t+1})]): f_t the target's feature at t (its last
layer's output after the final norm, what the LM head reads) and e(x_{t+1}) the shared embedding of the next
token. One decoder layer (copied from the target's last layer) then predicts f_{t+1}, and the target's LM head,
or a frequent-token subset of it (`llmcompress.speculative.vocab`), turns that into q(x_{t+2}).

While drafting, its own predicted features stand in for the target's. After each verification the target's
true features of the accepted positions replace them: the draft's KV cache keeps only entries built from true
features. Decoding stays exactly lossless (same acceptance rule as `decode.speculative_decode`).

Training (`train_feature_draft`) is online, with the frozen target inside every step on the token windows
supplying its features f and its logits, or offline, with those features made once (`cache_target_sequences`,
which also makes the target's continuations); loss = SmoothL1(f_hat, f) * `feature_weight` + a divergence between the
target's p and the draft's q * `logit_weight` (fkl: the soft cross-entropy less p's entropy, same gradient), both
over every position (no prompt to mask in fixed text).
The logits are compared over the draft's proposal ids when it has a subset head. Everything but the draft's fc
and layers is frozen. Trained on true features only, the draft meets its own predicted ones for the first time
when it drafts a second token; `unroll` d > 1 also trains proposals 2..d as drafting makes them (EAGLE-3's
training-time test, `unrolled_forward`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache

from llmcompress.models.modeling_llmcompress import head_linear
from llmcompress.speculative.decode import (DecodeStats, _check_prompt, _vocab, cut_at_eos, finish, keep_drafting,
                                            look_up, probs, rollback, sample, verify_round)
from llmcompress.speculative import divergences
from llmcompress.speculative.divergences import DivergenceSpec
from llmcompress.speculative.lookup import LookupConfig
from llmcompress.speculative.schedule import SCHEDULE_DEFAULTS, LrScheduleFields


FEATURE_FILE = "feature_draft.json"


def _logits(model, h: torch.Tensor) -> torch.Tensor:
    """The LM head of `model` (a plain head through `head_linear`, a subset head as itself). h: [..., D] -> [..., V]"""
    head = model.lm_head
    return head_linear(h, head.weight, head.bias) if type(head) is nn.Linear else head(h)


def target_features(target, ids: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
    """Feed `ids` [B, S] through the target's layers with `cache`. -> features [B, S, D] (after the final norm)"""
    out = target.model(ids, cache=cache, use_cache=cache is not None) if hasattr(target, "model") else None
    if not isinstance(out, tuple):
        raise ValueError("a feature draft needs a target in llmcompress's model graph (llmcompress.models.load)")
    return out[0]


def target_forward(target, ids: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed `ids` [B, S] through the target with `cache`. -> (features [B, S, D], logits [B, S, V])"""
    feats = target_features(target, ids, cache)
    return feats, _logits(target, feats)


class FeatureDraft(nn.Module):
    """fc([f_t ; e(x_{t+1})]) -> the draft's decoder layers and final norm -> f_hat_{t+1} -> LM head."""

    def __init__(self, body):
        super().__init__()
        self.body = body  # a DeciLMForCausalLM: the draft's layers, the target's final norm, embedding and head
        d = body.config.hidden_size
        ref = next(body.parameters())
        self.fc = nn.Linear(2 * d, d, bias=True, device=ref.device, dtype=ref.dtype)
        with torch.no_grad():  # start as f_t + e(x_{t+1})
            eye = torch.eye(d, device=ref.device, dtype=ref.dtype)
            self.fc.weight.copy_(torch.cat([eye, eye], 1))
            self.fc.bias.zero_()

    @classmethod
    def from_target(cls, target, layers: list[int] | None = None, calib: torch.Tensor | None = None
                    ) -> "FeatureDraft":
        """A feature draft whose decoder layers are copies of the target's `layers` (default: its last one).
        With `calib` token ids [B, S], fc starts balanced (`balance_inputs`); without, as f_t + e(x_{t+1})."""
        from llmcompress.speculative.draft_init import keep_layers

        n = len(target.model.layers)
        keep = layers if layers is not None else [n - 1]
        if not keep or any(not 0 <= i < n for i in keep):
            raise ValueError(f"feature draft layers {keep}: choose indices in 0..{n - 1}")
        body = keep_layers(target, sorted(keep))
        draft = cls(body)
        draft.init_layers = sorted(keep)
        draft.tokenizer = getattr(target, "tokenizer", None)
        if calib is not None:
            draft.balance_inputs(target, calib)
        return draft.eval()

    @torch.no_grad()
    def balance_inputs(self, target, calib: torch.Tensor) -> dict:
        """Set fc to scaled identities so that f_t and e(x_{t+1}) enter the first layer with equal RMS, summing to
        the RMS of the residual stream that layer saw inside the target (measured on `calib` [B, S]). The target's
        features are ~16x larger than its embeddings (SmolLM2: RMS 1.9 vs 0.12): a plain sum would drown the
        token. -> the three RMS values"""
        out = target(calib, output_hidden_states=True)
        resid = out.hidden_states[self.init_layers[0]]  # [B, S, D]: the input of the first copied layer
        rms = lambda x: x.float().pow(2).mean().sqrt()  # noqa: E731
        rs, rf, re = rms(resid), rms(target_features(target, calib, None)), rms(target.model.embed_tokens(calib))
        eye = torch.eye(self.fc.in_features // 2, device=self.fc.weight.device, dtype=self.fc.weight.dtype)
        self.fc.weight.copy_(torch.cat([eye * (rs / rf / 2 ** 0.5), eye * (rs / re / 2 ** 0.5)], 1))
        self.fc.bias.zero_()
        return {"residual": float(rs), "features": float(rf), "embeddings": float(re)}

    # the attributes that reports and checks read from any draft
    @property
    def config(self):
        return self.body.config

    @property
    def model(self):
        return self.body.model

    def get_output_embeddings(self):
        return self.body.lm_head

    @property
    def lm_head(self):
        return self.body.lm_head

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, cache: DynamicCache | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [B, S, D] (f_t), tokens: [B, S] (x_{t+1}) -> (f_hat [B, S, D] (f_{t+1}), logits [B, S, V]).
        position_ids [B, S] and a bool mask [B, 1, S, past + S] replace the cache's positions and causal mask
        (`unrolled_forward`)."""
        e = self.body.model.embed_tokens(tokens)  # [B, S, D]
        x = self.fc(torch.cat([features.to(e.dtype), e], -1))
        h, _, _ = self.body.model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids, cache=cache,
                                  use_cache=cache is not None)
        return h, _logits(self.body, h)

    def trainable(self) -> dict[str, nn.Parameter]:
        """What training moves: fc and the decoder layers (embedding, final norm and head stay the target's)."""
        return {k: p for k, p in self.named_parameters() if k.startswith("fc.") or ".layers." in k}

    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the trained tensors (in `dtype`, default their own) and what rebuilds the draft from its target
        (`load`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.trainable().items()},
                  str(folder / "feature_draft.safetensors"))
        meta = {"kind": "feature", "layers": getattr(self, "init_layers", None),
                "vocab": [int(i) for i in self.body.lm_head.keep] if hasattr(self.body.lm_head, "keep") else None}
        (folder / FEATURE_FILE).write_text(json.dumps(meta))
        return folder

    @classmethod
    def load(cls, target, folder: str | Path) -> "FeatureDraft":
        folder = Path(folder)
        meta_path = folder / FEATURE_FILE
        if not meta_path.is_file():
            raise ValueError(f"{folder} holds no feature draft (feature_draft.json); train one with "
                             "llmcompress draft --init feature:1")
        meta = json.loads(meta_path.read_text())
        draft = cls.from_target(target, meta["layers"])
        if meta.get("vocab"):
            from llmcompress.speculative.vocab import restrict_vocab

            restrict_vocab(draft.body, torch.tensor(meta["vocab"]))
        state = load_file(str(folder / "feature_draft.safetensors"))
        params = draft.trainable()
        if set(state) != set(params):
            raise ValueError(f"{folder}: the saved tensors do not fit this target's feature draft")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(state[k].to(p.dtype))
        return draft.eval()


def is_feature_draft(draft) -> bool:
    return isinstance(draft, FeatureDraft)


def start_features(target, seq: torch.Tensor, tcache: DynamicCache, stats: DecodeStats, temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Begin a feature-draft decode of `seq` [1, P]: the target's features of every token but the last, the
    target cache holding them. A one-token prompt has no feature yet, so the target first takes one plain step
    (counted into `stats`). -> (seq, feats [len - 1, D])"""
    if seq.shape[1] > 1:
        return seq, target_features(target, seq[:, :-1], tcache)[0]  # [P - 1, D]
    f, pl = target_forward(target, seq, tcache)
    p = probs(pl[0, -1], temperature)
    tok = int(p.argmax()) if temperature == 0 else sample(p, generator)
    stats.target_calls += 1
    stats.accepted_per_call.append(0)
    stats.drafted_per_call.append(0)
    stats.looked_up_per_call.append(False)
    return torch.cat([seq, seq.new_tensor([[tok]])], 1), f[0]


def decoding(seq: torch.Tensor, prompt_len: int, end: int, eos_token_id: int | None) -> bool:
    """Whether decoding goes on: `seq` [1, L] is shorter than `end` and its last new token is not EOS."""
    return seq.shape[1] < end and not (eos_token_id is not None and int(seq[0, -1]) == eos_token_id
                                       and seq.shape[1] > prompt_len)


# ----------------------------------------------------------------------------- decoding
@torch.no_grad()
def feature_speculative_decode(target, draft: FeatureDraft, prompt: torch.Tensor, max_new_tokens: int,
                               gamma: int = 4, temperature: float = 0.0, generator: torch.Generator | None = None,
                               eos_token_id: int | None = None, stop_below: float = 0.0,
                               lookup: LookupConfig | None = None) -> tuple[torch.Tensor, DecodeStats]:
    """`decode.speculative_decode` with a feature draft (`stop_below`, `lookup`: as there). prompt: [1, P] ->
    ([1, P + new], stats).

    Invariants: the target cache holds every token of `seq` but the last, `feats` [len - 1, D] their features;
    the draft cache holds `fed` entries, entry t (1-based) built from (f_{t-1}, x_t) with true features only
    (a looked-up round leaves it alone: the next drafted round feeds it every true pair it lacks)."""
    _check_prompt(prompt)
    if gamma < 1:
        raise ValueError(f"gamma={gamma} must be >= 1")
    greedy = temperature == 0
    seq = prompt.to(next(target.parameters()).device)
    end = seq.shape[1] + max_new_tokens
    tcache, dcache = DynamicCache(), DynamicCache()
    stats = DecodeStats(gamma=gamma)
    seq, feats = start_features(target, seq, tcache, stats, temperature, generator)
    fed, history = 0, seq[0].tolist()
    while decoding(seq, prompt.shape[1], end, eos_token_id):
        n = seq.shape[1] - 1  # index of the last token; feats covers 0..n-1
        drafted, qs = look_up(history, lookup, end - seq.shape[1], _vocab(target), seq.device, temperature)
        qls, looked_up = [], bool(drafted)  # a looked-up round has no logits: alpha leaves it out
        f_in, x_in = feats[fed:n][None], seq[:, fed + 1:n + 1]  # the true pairs the draft lacks
        for _ in range(0 if looked_up else gamma):
            h, ql = draft(f_in, x_in, dcache)
            ql = ql[0, -1]
            q = probs(ql, temperature)
            tok = int(q.argmax()) if greedy else sample(q, generator)
            drafted.append(tok)
            qs.append(q)
            qls.append(ql)
            f_in, x_in = h[:, -1:], seq.new_tensor([[tok]])
            if not keep_drafting(ql, q, tok, temperature, stop_below):
                break
        fv, pl = target_forward(target, torch.cat([seq[:, -1:], seq.new_tensor([drafted])], 1), tcache)
        pl, fv = pl[0], fv[0]  # [k + 1, V], [k + 1, D]: positions n .. n + k (k proposed)
        m, nxt = verify_round(drafted, qs, qls, pl, temperature, generator, stats, looked_up)
        new = drafted[:m] + [nxt]
        seq = torch.cat([seq, seq.new_tensor([new])], 1)
        history += new
        feats = torch.cat([feats, fv[: m + 1]])
        rollback(tcache, seq.shape[1] - 1)
        if not looked_up:
            rollback(dcache, n)  # keep the entries built from true features
            fed = n
        seq, stop = cut_at_eos(seq, new, eos_token_id)
        if stop:
            break
    return finish(seq, prompt.shape[1], end, stats)


@torch.no_grad()
def feature_step_cost(draft: FeatureDraft, target, prompt: torch.Tensor, steps: int) -> tuple[list, list]:
    """Times of single-token cached steps of the draft and of the target after `prompt` [1, P], alternating.
    -> (draft seconds, target seconds)"""
    seq = prompt.to(next(target.parameters()).device)
    tcache, dcache = DynamicCache(), DynamicCache()
    feats = target_features(target, seq, tcache)
    draft(feats[:, :-1], seq[:, 1:], dcache)
    f, tok = feats[:, -1:], seq[:, -1:]
    times: tuple[list, list] = ([], [])
    for _ in range(steps):
        t0 = time.perf_counter()
        draft(f, tok, dcache)
        t1 = time.perf_counter()
        target_forward(target, tok, tcache)
        t2 = time.perf_counter()
        times[0].append(t1 - t0)
        times[1].append(t2 - t1)
    return times


# ----------------------------------------------------------------------------- training
class FeatureDistillConfig(LrScheduleFields):
    """Online training of a feature draft (the `draft` stage's fields when `init` is feature:K)."""

    model_config = ConfigDict(extra="forbid")
    divergence: DivergenceSpec = Field("fkl", description="the logit term: fkl, rkl, tvd, accept, jsd or jsd:BETA")
    feature_weight: float = Field(1.0, ge=0, description="weight of SmoothL1(f_hat, f)")
    logit_weight: float = Field(0.1, ge=0, description="weight of the divergence between p and q")
    temperature: float = Field(1.0, gt=0, description="temperature of p and q in the divergence")
    noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to the input features, relative "
                         "to their RMS (robustness to the draft's own, imperfect features)")
    unroll: int = Field(1, ge=1, le=8, description="train the proposals this deep: beyond the first, the draft "
                        "reads its own predicted features, as when it drafts (EAGLE-3's training-time test; each "
                        "extra depth costs about one more draft pass per step)")
    batch_size: int = Field(8, gt=0)
    lr: float = Field(3e-4, gt=0)
    steps: int | None = Field(200, gt=0)
    tokens: int | None = Field(None, gt=0, description="stop after this many training tokens")
    seconds: float | None = Field(None, gt=0, description="stop after this much wall-clock time in this run")
    checkpoint_every: int = Field(50, gt=0)
    eval_every: int = Field(50, gt=0)
    seed: int = 0


def unroll_mask(length: int, depth: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The keys a depth-`depth` query may attend to in `unrolled_forward`. Keys come in `depth` blocks of `length`
    positions, block k - 1 holding the depth-k entries. Query p sees the true entries j <= p - depth + 1 and, for
    k = 2..depth, the depth-k entry at p - depth + k: the chain of proposals it was drafted after, as in decoding.
    -> bool [1, 1, length, depth * length]"""
    p = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    blocks = [j <= p - depth + 1] + [j == p - depth + k for k in range(2, depth + 1)]
    return torch.cat(blocks, 1)[None, None]


def unrolled_forward(draft: FeatureDraft, f_in: torch.Tensor, tokens: torch.Tensor, depth: int
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The draft run `depth` proposals deep at every position at once (EAGLE-3's training-time test).

    f_in: [B, S, D] true features f_t, tokens: [B, S] x_{t+1}. Depth 1 is the plain pass. At depth d, position p
    reads (h_{d-1}[p - 1], x_{p+1}): its own previous prediction of f_p in place of the true one, attending as in
    `unroll_mask`; like depth 1 it predicts f_{p+1} and x_{p+2}. Positions p < d - 1 have no such chain and are
    meaningless at depth d. -> [(h [B, S, D], logits [B, S, V])] per depth"""
    B, S = tokens.shape
    if depth == 1:
        return [draft(f_in, tokens)]
    cache = DynamicCache()  # the blocks of keys of the depths so far
    pos = torch.arange(S, device=tokens.device)[None].expand(B, S)
    outs = [draft(f_in, tokens, cache, pos)]
    for d in range(2, depth + 1):
        prev = torch.cat([f_in[:, :1], outs[-1][0][:, :-1]], 1)  # [B, S, D]: h_{d-1}[p - 1] (p = 0: a stand-in)
        outs.append(draft(prev, tokens, cache, pos, unroll_mask(S, d, tokens.device)))
    return outs


def feature_draft_loss(draft: FeatureDraft, feats: torch.Tensor, tokens: torch.Tensor, target_logits: torch.Tensor,
                       cfg: FeatureDistillConfig, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, dict]:
    """feats: [B, S, D] target features, tokens: [B, S], target_logits: [B, S, K] (over the draft's ids) ->
    (loss, parts). Position t reads (f_t, x_{t+1}) and is scored against f_{t+1} and p(. | x_{<= t+1}); with
    `cfg.unroll` > 1 also each deeper proposal (`unrolled_forward`) against the same, the loss the mean over depths.
    parts: the mean SmoothL1 and divergence, top-1 agreement at depth 1 (`top1`) and at each deeper one."""
    f_in = feats[:, :-1]
    if cfg.noise > 0:
        rms = f_in.pow(2).mean().sqrt()
        noise = torch.randn(f_in.shape, generator=generator, device=f_in.device, dtype=f_in.dtype)
        f_in = f_in + noise * cfg.noise * rms
    head = draft.body.lm_head
    f_out, p_logits = feats[:, 1:].float(), target_logits[:, 1:].float()  # [B, S-1, D], [B, S-1, K]
    loss, parts = 0.0, {"feature": 0.0, "divergence": 0.0}
    for d, (h, q_logits) in enumerate(unrolled_forward(draft, f_in, tokens[:, 1:], cfg.unroll), 1):
        if hasattr(head, "keep"):
            q_logits = q_logits[..., head.keep]
        h, q_logits, pl = h[:, d - 1:], q_logits[:, d - 1:], p_logits[:, d - 1:]  # the positions with a chain
        feat = F.smooth_l1_loss(h.float(), f_out[:, d - 1:])
        div = divergences.divergence_loss(cfg.divergence, pl, q_logits.float(), temperature=cfg.temperature)
        loss = loss + (cfg.feature_weight * feat + cfg.logit_weight * div) / cfg.unroll
        parts["feature"] += feat.item() / cfg.unroll
        parts["divergence"] += div.item() / cfg.unroll
        parts["top1" if d == 1 else f"top1_depth{d}"] = (q_logits.argmax(-1) == pl.argmax(-1)).float().mean().item()
    return loss, parts


@torch.no_grad()
def cache_target_sequences(target, prompts: torch.Tensor, new_tokens: int, folder: str | Path, chunk: int = 32,
                           progress: Callable[[str, int, int], None] | None = None, temperature: float = 0.0,
                           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's continuations of `prompts` [N, P] (greedy, or sampled at `temperature`, chunk i seeded
    seed + i) and its features over them, made `chunk` prompts at a
    time into `folder` (one safetensors file per chunk: a rerun continues where it stopped, and a call with more
    prompts that begin with the same ones reuses their chunks; each chunk is checked to hold its prompts).
    new_tokens 0: the features of `prompts` themselves (fixed text).
    -> (tokens [N, P + new_tokens], features [N, P + new_tokens, D] float16)"""
    from llmcompress.speculative.train import generate

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ident = {"prompt_tokens": prompts.shape[1], "new_tokens": new_tokens, "chunk": chunk,
             "layers": len(target.model.layers), "hidden": target.config.hidden_size}
    if temperature > 0:  # greedy continuations do not depend on the seed
        ident |= {"temperature": temperature, "seed": seed}
    meta = folder / "sequences.json"
    if meta.is_file() and json.loads(meta.read_text()) != ident:
        raise ValueError(f"{folder} holds target sequences made with other settings; use another folder")
    meta.write_text(json.dumps(ident))
    seqs, feats = [], []
    for i, c in enumerate(range(0, len(prompts), chunk)):
        path = folder / f"seq-{i:05d}.safetensors"
        if not path.is_file():
            part = prompts[c:c + chunk].to(next(target.parameters()).device)
            seq = generate(target, part, new_tokens, temperature, seed + i) if new_tokens else part  # [b, P + new]
            f = target_features(target, seq, None).half()  # [b, P + new, D]
            save_file({"tokens": seq.cpu(), "features": f.cpu().contiguous()}, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
        part = load_file(str(path))
        if not torch.equal(part["tokens"][:, : prompts.shape[1]], prompts[c:c + chunk].cpu()):
            raise ValueError(f"{path} holds the sequences of other prompts; use another folder")
        seqs.append(part["tokens"])
        feats.append(part["features"])
        if progress:
            progress("target sequences", min(c + chunk, len(prompts)), len(prompts))
    return torch.cat(seqs), torch.cat(feats)


def train_feature_draft(target, draft: FeatureDraft, windows: torch.Tensor, cfg: FeatureDistillConfig, out: Path,
                        evaluate: Callable[[FeatureDraft], dict] | None = None,
                        progress: Callable[[str, int, int], None] | None = None,
                        features: torch.Tensor | None = None) -> dict:
    """Train on token `windows` [N, S]; checkpoints in `out/checkpoint` (a rerun resumes). -> report

    Online (`features` None): the target runs inside every step. Offline: `features` [N, S, D] are the target's
    features of `windows`, computed once (`cache_target_sequences`); its logits come from them through its head."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, S] token ids with S >= 2, got {tuple(windows.shape)}")
    if features is not None and features.shape[:2] != windows.shape:
        raise ValueError(f"features {tuple(features.shape)} do not match windows {tuple(windows.shape)}")
    if cfg.steps is None and cfg.tokens is None and cfg.seconds is None:
        raise ValueError("give the feature draft a budget: steps, tokens or seconds")
    device = next(target.parameters()).device
    target.eval()
    for p in draft.parameters():
        p.requires_grad_(False)
    params = draft.trainable()
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, weight_decay=0.0)
    ckpt = Path(out) / "checkpoint"
    ident = cfg.model_dump(exclude={"steps", "tokens", "seconds", "checkpoint_every", "eval_every"}) | {
        "windows": list(windows.shape), "offline": features is not None, "params": sorted(params)}
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "log": [], "acceptance": [], "identity": ident}
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        if SCHEDULE_DEFAULTS | (state.get("identity") or {}) != ident:
            raise ValueError(f"{ckpt} holds a feature-draft run with other settings; give another output folder "
                             "or delete that checkpoint to start over")
        saved = load_file(str(ckpt / "draft.safetensors"))
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(saved[k])
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    head = draft.body.lm_head
    keep = head.keep if hasattr(head, "keep") else None
    w_t = target.lm_head.weight if keep is None else target.lm_head.weight[keep]  # [K, D]
    gen = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(windows), generator=gen)
    gen_noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    t_run = time.perf_counter()

    def done() -> bool:
        return ((cfg.steps is not None and state["step"] >= cfg.steps)
                or (cfg.tokens is not None and state["tokens"] >= cfg.tokens)
                or (cfg.seconds is not None and time.perf_counter() - t_run >= cfg.seconds and state["step"] > 0))

    draft.train()
    while not done():
        i = state["step"] * cfg.batch_size
        idx = order[torch.arange(i, i + cfg.batch_size) % len(windows)]
        tokens = windows[idx].to(device)  # [B, S]
        t0 = time.perf_counter()
        with torch.no_grad():
            if features is None:
                feats = target_features(target, tokens, None)  # [B, S, D]
            else:
                feats = features[idx].to(device=device, dtype=w_t.dtype)
            tl = head_linear(feats, w_t)  # [B, S, K]
        loss, parts = feature_draft_loss(draft, feats, tokens, tl, cfg, gen_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(state["step"])
        opt.step()
        state["step"] += 1
        state["tokens"] += int(tokens.numel())
        state["seconds"] += time.perf_counter() - t0
        state["log"].append({"step": state["step"], "loss": loss.item(), "lr": opt.param_groups[0]["lr"]} | parts)
        if progress:
            progress("feature draft", state["step"], cfg.steps or 0)
        last = done()
        if evaluate is not None and (state["step"] % cfg.eval_every == 0 or last):
            draft.eval()
            state["acceptance"].append({"step": state["step"]} | evaluate(draft))
            draft.train()
        if state["step"] % cfg.checkpoint_every == 0 or last:
            _save(ckpt, params, opt, state)
    draft.eval()
    for p in draft.parameters():
        p.requires_grad_(False)
    first, tail = state["log"][:10], state["log"][-10:]
    mean = lambda rows, k: sum(r[k] for r in rows) / max(len(rows), 1)  # noqa: E731
    return {"steps": state["step"], "tokens": state["tokens"], "seconds": state["seconds"],
            "loss_first": mean(first, "loss"), "loss_last": mean(tail, "loss"),
            "top1_first": mean(first, "top1"), "top1_last": mean(tail, "top1"),
            "top1_last_by_depth": [mean(tail, "top1" if d == 1 else f"top1_depth{d}")
                                   for d in range(1, cfg.unroll + 1)],
            "acceptance": state["acceptance"], "config": cfg.model_dump()}


def _save(folder: Path, params: dict, opt, state: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: p.detach().contiguous().cpu() for k, p in params.items()}, str(folder / "draft.safetensors"))
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.rename(folder / "state.json")


__all__ = ["FeatureDistillConfig", "FeatureDraft", "cache_target_sequences", "feature_draft_loss",
           "feature_speculative_decode", "feature_step_cost", "is_feature_draft", "target_features", "target_forward",
           "train_feature_draft", "unroll_mask", "unrolled_forward"]
