"""DistillSpec: distil a draft towards the target's next-token distributions (Zhou et al. 2023).

Each step takes a batch of sequences = prompt + continuation and minimises a token-level divergence
between the target's p and the draft's q on the continuation positions (the prompt is masked out).
Continuations come from (`data`):
  fixed      the training text itself (windows of the corpus; the first `prompt_tokens` act as prompt)
  target     sampled from the target            (teacher-generated)
  on-policy  sampled from the current draft     (student-generated)
  mixture    on-policy with probability `mixture` (lambda) per batch, fixed text otherwise
Target signals (`online`):
  online     the frozen target runs inside every step on the batch: full logits, plus the features the
             LM head reads (the last decoder layer's output after the final norm); loss = divergence
             (fkl = soft cross-entropy minus the target's entropy, same gradient)
             + `feature_weight` * SmoothL1(proj(h_draft), h_target), proj a learned linear map when widths differ
  offline    target log-probs of the (draft-independent) fixed or target-generated sequences are computed
             once and kept as top-k (`offline_topk`); the tail mass is spread evenly over the other tokens
Budget: `steps`, `tokens` (continuation tokens trained on) and/or `seconds` (wall clock of this run),
whichever ends first. Every `checkpoint_every` steps the
draft, the projection and the optimiser go to `<out>/checkpoint/` (safetensors + JSON) and a rerun with
the same settings resumes there (a larger budget continues the run). Every `eval_every` steps, greedy
speculative decoding on held-out prompts logs alpha and tau: the report shows acceptance as training goes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import time
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from llmcompress.speculative import divergences
from llmcompress.speculative.divergences import DivergenceSpec
from llmcompress.speculative.decode import DecodeStats, speculative_decode
from llmcompress.speculative.schedule import SCHEDULE_DEFAULTS, LrScheduleFields
from llmcompress.speculative.vocab import token_counts

DataSource = Literal["fixed", "target", "on-policy", "mixture"]


class DistillConfig(LrScheduleFields):
    """How a draft is distilled. These fields are the `draft` stage's recipe section and the CLI's options."""

    model_config = ConfigDict(extra="forbid")
    divergence: DivergenceSpec = Field("fkl", description="fkl, rkl, tvd, accept, jsd or jsd:BETA")
    data: DataSource = "on-policy"
    mixture: float = Field(0.5, ge=0, le=1, description="lambda: share of on-policy batches when data=mixture")
    online: bool = Field(True, description="target logits and features computed inside each step")
    offline_topk: int = Field(64, gt=0, description="target log-probs kept per token in offline mode")
    temperature: float = Field(1.0, gt=0, description="temperature of p and q in the divergence")
    gen_temperature: float = Field(1.0, ge=0, description="sampling temperature of generated continuations "
                                   "(0: greedy; greedy target continuations are generated once per prompt)")
    gen_batch_size: int | None = Field(None, gt=0, description="target continuations are made this many per "
                                       "generate call: fewer, fuller calls (GPU). Greedy ones (made once per "
                                       "prompt): the batch's new prompts topped up with others not made yet; "
                                       "sampled ones: a pool of fresh samples for random prompts, each used once")
    with_fixed_text: bool = Field(False, description="feature drafts with data target: also train on the windows' "
                                  "own text (its features cost one teacher-forced target pass, far less than "
                                  "generating): more, and more varied, data for a draft that overfits the "
                                  "continuations alone")
    unroll: int = Field(1, ge=1, le=8, description="feature drafts: train the proposals this deep, each beyond "
                        "the first reading the draft's own predicted features as when it drafts (EAGLE-3's "
                        "training-time test)")
    prompt_tokens: int = Field(32, gt=0)
    new_tokens: int = Field(64, gt=0, description="continuation length (generated, or fixed text)")
    feature_weight: float = Field(0.1, ge=0, description="weight of the SmoothL1 feature loss (layer drafts: "
                                  "online only; feature drafts: always, the divergence weighs 1)")
    batch_size: int = Field(4, gt=0)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    freeze_embeddings: bool = Field(False, description="keep the (tied) embedding / LM head fixed: the draft "
                                    "then only moves its layers and final norm, each step is cheaper")
    steps: int | None = Field(200, gt=0, description="stop after this many steps")
    tokens: int | None = Field(None, gt=0, description="stop after this many continuation tokens")
    seconds: float | None = Field(None, gt=0, description="stop after this much wall-clock training time in this "
                                  "run (a rerun resumes the checkpoint and gets the time again)")
    draft_vocab: int | None = Field(None, gt=0, description="save the draft with an LM head over the N ids most "
                                    "frequent in its training continuations (plus special tokens): cheaper, lossless")
    eval_every: int = Field(50, gt=0)
    eval_prompts: int = Field(4, gt=0)
    eval_new_tokens: int = Field(32, gt=0)
    eval_gamma: int = Field(4, gt=0)
    checkpoint_every: int = Field(50, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if self.steps is None and self.tokens is None and self.seconds is None:
            raise ValueError("give a training budget: steps, tokens or seconds")
        if not self.online and self.data in ("on-policy", "mixture"):
            raise ValueError(f"data {self.data!r} samples from the draft as it trains, so the target's logits "
                             "cannot be precomputed; use online: true (or data fixed/target)")
        if self.with_fixed_text and self.data != "target":
            raise ValueError(f"with_fixed_text adds the corpus text to the target's continuations, but data is "
                             f"{self.data!r}; use data target (data fixed already trains on that text)")
        return self


# ----------------------------------------------------------------------------- pure pieces
def continuation_mask(batch: int, length: int, prompt_tokens: int) -> torch.Tensor:
    """Positions whose next token is a continuation token: prompt_tokens-1 .. length-2. -> bool [B, S]"""
    pos = torch.arange(length)
    return ((pos >= prompt_tokens - 1) & (pos < length - 1)).expand(batch, length)


def topk_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest log-probabilities and their token ids. [..., V] -> ([..., k], [..., k])"""
    return F.log_softmax(logits.float(), -1).topk(min(k, logits.shape[-1]), -1)


def expand_topk(values: torch.Tensor, indices: torch.Tensor, vocab: int) -> torch.Tensor:
    """Full log-probabilities from top-k ones, the remaining mass spread evenly over the other tokens. -> [..., V]"""
    k = values.shape[-1]
    if k == vocab:
        return torch.full(values.shape[:-1] + (vocab,), 0.0).scatter(-1, indices, values)
    # log(1 - sum top-k): the kept mass can round to >= 1 for peaked distributions, so clamp before the log
    mass = torch.logsumexp(values.float(), -1, keepdim=True).exp().clamp(max=1.0)
    rest = torch.log1p(-mass).clamp_min(-80.0)
    fill = rest - torch.log(torch.tensor(float(vocab - k)))
    out = fill.expand(values.shape[:-1] + (vocab,)).clone()
    return out.scatter(-1, indices, values)


def lm_head_input(model, out) -> torch.Tensor:
    """The features the LM head reads: the last decoder layer's output after the final norm. -> [B, S, D]"""
    return model.model.norm(out.hidden_states[-1])


def feature_loss(draft_h: torch.Tensor, target_h: torch.Tensor, mask: torch.Tensor, proj) -> torch.Tensor:
    """SmoothL1 between projected draft features and target features on masked positions. [B, S, D] -> scalar"""
    return F.smooth_l1_loss(proj(draft_h[mask].float()), target_h[mask].float())


# ----------------------------------------------------------------------------- data
@torch.no_grad()
def generate(model, prompts: torch.Tensor, new_tokens: int, temperature: float, seed: int) -> torch.Tensor:
    """Exactly `new_tokens` continuation tokens per prompt, sampled (temperature 0: greedy). [B, P] -> [B, P + new_tokens]"""
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, pad_token_id=0, **sampling)
    return out


def batch_source(cfg: DistillConfig, step: int) -> str:
    """Which data source step `step` uses (mixture: seeded coin with P(on-policy) = lambda)."""
    if cfg.data != "mixture":
        return cfg.data
    return "on-policy" if random.Random(cfg.seed * 1_000_003 + step).random() < cfg.mixture else "fixed"


# ----------------------------------------------------------------------------- training
class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def train_draft(target, draft, windows: torch.Tensor, eval_prompts: list[torch.Tensor], cfg: DistillConfig,
                out: Path | None = None, progress: Callable[[str, int, int], None] | None = None,
                targets_cache: Path | None = None) -> dict:
    """Distil `draft` towards `target` in place. windows: [N, S] training tokens: prompts are their first
    `prompt_tokens`, fixed continuations the next `new_tokens` (S >= prompt_tokens, plus new_tokens for
    fixed/mixture data). Offline runs keep the target's sequences and log-probs in `targets_cache` (default
    `out`), so a resumed run, or another divergence over the same data, does not make them again. -> report."""
    # generated continuations only need the prompts; fixed text needs prompt + continuation
    seq_len = cfg.prompt_tokens + (cfg.new_tokens if cfg.data in ("fixed", "mixture") else 0)
    if windows.shape[1] < seq_len:
        raise ValueError(f"training windows have {windows.shape[1]} tokens; data {cfg.data!r} needs {seq_len} "
                         f"(prompt_tokens {cfg.prompt_tokens}" + (f" + new_tokens {cfg.new_tokens})" if
                                                                  seq_len > cfg.prompt_tokens else ")"))
    windows = windows[:, :seq_len]
    device = next(draft.parameters()).device
    target.eval().requires_grad_(False)
    dt, tt = draft.config.hidden_size, target.config.hidden_size
    proj = (torch.nn.Linear(dt, tt, bias=False) if dt != tt else _Identity()).to(device)
    draft.requires_grad_(True)  # a draft copied from a target that an earlier run froze would train nothing
    if cfg.freeze_embeddings:
        draft.get_input_embeddings().requires_grad_(False)
        draft.get_output_embeddings().requires_grad_(False)
    params = [p for p in draft.parameters() if p.requires_grad] + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = {"step": 0, "tokens": 0, "history": [], "evals": [],
             "counts": torch.zeros(target.config.vocab_size, dtype=torch.long)}  # continuation ids seen
    ckpt = out / "checkpoint" if out is not None else None
    if ckpt is not None and (ckpt / "state.json").exists():
        state = _load_checkpoint(ckpt, cfg, draft, proj, opt)
    offline = None
    if not cfg.online:
        windows, offline = _offline_targets(target, windows, cfg, targets_cache or out)
    if not state["evals"]:
        state["evals"].append(_eval(target, draft, eval_prompts, cfg, state))

    started, first_step = time.monotonic(), state["step"]

    def done() -> bool:  # the clock ends a run only after it made one step
        return (cfg.steps is not None and state["step"] >= cfg.steps) or \
               (cfg.tokens is not None and state["tokens"] >= cfg.tokens) or \
               (cfg.seconds is not None and state["step"] > first_step and time.monotonic() - started >= cfg.seconds)

    # progress total: the step or token budget; a time budget alone shows steps done against 0 (unknown)
    total = cfg.steps or (-(-cfg.tokens // (cfg.batch_size * cfg.new_tokens)) if cfg.tokens else 0)
    greedy_pool: dict[int, torch.Tensor] = {}  # window index -> greedy target sequence [S]
    sample_pool: list[torch.Tensor] = []  # sampled target sequences [S] not trained on yet (not checkpointed)
    while not done():
        step = state["step"]
        idx = torch.randperm(len(windows), generator=torch.Generator().manual_seed(cfg.seed + step))[: cfg.batch_size]
        source = batch_source(cfg, step)
        prompts = windows[idx, : cfg.prompt_tokens].to(device)
        if source == "fixed" or offline is not None:  # offline: windows are the sequences its log-probs belong to
            seqs = windows[idx].to(device)
        elif source == "target" and cfg.gen_temperature == 0:  # deterministic: generate each prompt once
            todo = [i for i in idx.tolist() if i not in greedy_pool]
            if todo and cfg.gen_batch_size and len(todo) < cfg.gen_batch_size:  # top up with prompts not made yet
                wanted = set(todo)
                extra = (i for i in range(len(windows)) if i not in greedy_pool and i not in wanted)
                todo += list(itertools.islice(extra, cfg.gen_batch_size - len(todo)))
            if todo:
                made = generate(target, windows[todo, : cfg.prompt_tokens].to(device), cfg.new_tokens, 0.0, 0)
                greedy_pool.update(zip(todo, made.cpu()))
            seqs = torch.stack([greedy_pool[i] for i in idx.tolist()]).to(device)
        elif source == "target" and cfg.gen_batch_size:  # sampled: made a pool at a time, each sequence used once
            if len(sample_pool) < cfg.batch_size:
                g = torch.Generator().manual_seed(cfg.seed + 1_000_003 * (step + 1))
                pick = torch.randint(0, len(windows), (max(cfg.gen_batch_size, cfg.batch_size),), generator=g)
                made = generate(target, windows[pick, : cfg.prompt_tokens].to(device), cfg.new_tokens,
                                cfg.gen_temperature, cfg.seed + step)
                sample_pool += list(made.cpu())
            seqs = torch.stack(sample_pool[: cfg.batch_size]).to(device)
            del sample_pool[: cfg.batch_size]
        else:
            gen_model = target if source == "target" else draft.eval()
            seqs = generate(gen_model, prompts, cfg.new_tokens, cfg.gen_temperature, cfg.seed + step)
        # only the last new_tokens + 1 positions can predict a continuation token: the LM head (the costliest
        # matmul of a small draft) and the vocabulary-sized losses run on those alone
        keep = min(cfg.new_tokens + 1, seqs.shape[1])
        mask = continuation_mask(len(seqs), seqs.shape[1], cfg.prompt_tokens).to(device)[:, -keep:]  # [B, keep]
        state["counts"] += token_counts(seqs[:, cfg.prompt_tokens:].cpu(), len(state["counts"]))  # the tokens to predict
        draft.train()
        d_out = draft(seqs, output_hidden_states=cfg.online, logits_to_keep=keep)
        if cfg.online:
            with torch.no_grad():
                t_out = target(seqs, output_hidden_states=True, logits_to_keep=keep)
            loss = divergences.divergence_loss(cfg.divergence, t_out.logits, d_out.logits, mask, cfg.temperature)
            div = loss.item()
            if cfg.feature_weight > 0:
                feats = lm_head_input(draft, d_out)[:, -keep:], lm_head_input(target, t_out)[:, -keep:]  # [B, k, D]
                loss = loss + cfg.feature_weight * feature_loss(*feats, mask, proj)
        else:
            # log-probs serve as logits: softmax(log p / T) is the target's distribution at temperature T
            logp = expand_topk(offline[0][idx][:, -keep:], offline[1][idx][:, -keep:],
                               target.config.vocab_size).to(device)
            loss = divergences.divergence_loss(cfg.divergence, logp, d_out.logits, mask, cfg.temperature)
            div = loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = cfg.lr_at(step)
        opt.step()
        draft.eval()
        state["step"] += 1
        state["tokens"] += int(mask.sum())
        state["history"].append({"step": state["step"], "tokens": state["tokens"], "source": source,
                                 "loss": loss.item(), "divergence": div, "lr": opt.param_groups[0]["lr"]})
        if state["step"] % cfg.eval_every == 0 or done():
            state["evals"].append(_eval(target, draft, eval_prompts, cfg, state))
        if ckpt is not None and (state["step"] % cfg.checkpoint_every == 0 or done()):
            _save_checkpoint(ckpt, cfg, draft, proj, opt, state)
        if progress:
            progress("distilling draft", state["step"], total)
    return {"steps": state["step"], "tokens": state["tokens"], "divergence": cfg.divergence, "data": cfg.data,
            "online": cfg.online, "acceptance": state["evals"], "loss_first": _mean_loss(state["history"][:10]),
            "loss_last": _mean_loss(state["history"][-10:]), "continuation_counts": state["counts"],
            "lr_by_step": [h.get("lr") for h in state["history"]]}


def distill(target, init: str, corpus, cfg: DistillConfig, out: Path, num_samples: int = 64,
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Init a draft from `target` (`init`: layers:K, important:K or a model), distil it on `corpus` (a
    `llmcompress.data.Corpus`; held-out documents give the acceptance prompts) and save it to `out/model`."""
    from llmcompress.models import save
    from llmcompress.speculative.draft_init import init_draft
    from llmcompress.speculative.evaluate import prompts_from_texts

    if getattr(target, "tokenizer", None) is None:
        raise ValueError("distilling a draft needs the target's tokenizer; the model folder has none")
    if init.startswith("feature:"):
        return _distill_feature(target, init, corpus, cfg, out, num_samples, progress)
    if cfg.with_fixed_text:
        raise ValueError(f"with_fixed_text is for feature drafts (init feature:K), not {init!r}; for a layer "
                         "draft use data mixture or fixed")
    if cfg.unroll > 1:
        raise ValueError(f"unroll is for feature drafts (init feature:K), not {init!r}: a layer draft already "
                         "reads its own tokens, not the target's features; leave unroll at 1")
    windows = corpus.train_batches(num_samples, cfg.prompt_tokens + cfg.new_tokens)
    draft = init_draft(target, init, windows[:8])
    prompts = prompts_from_texts(target.tokenizer, corpus.heldout_texts, cfg.eval_prompts, cfg.prompt_tokens)
    report = train_draft(target, draft, windows, prompts, cfg, out, progress)
    counts = report.pop("continuation_counts")
    save(draft, out / "model", overwrite=True, tokenizer=target.tokenizer)
    if cfg.draft_vocab:
        from llmcompress.speculative.vocab import frequent_tokens, save_vocab, special_ids

        keep = frequent_tokens(counts, cfg.draft_vocab, special_ids(target.tokenizer))
        save_vocab(out / "model", keep, target.config.vocab_size, f"the {cfg.draft_vocab} ids most frequent in "
                   f"{int(counts.sum()):,} training continuation tokens, plus special tokens")
        report["draft_vocab"] = cfg.draft_vocab
    report |= {"init": init, "init_layers": getattr(draft, "init_layers", None), "draft": str(out / "model"),
               "draft_layers": len(draft.model.layers), "train_sequences": len(windows)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _distill_feature(target, init: str, corpus, cfg: DistillConfig, out: Path, num_samples: int,
                     progress: Callable[[str, int, int], None] | None) -> dict:
    """`distill` for a feature draft (`init` feature:K): fixed text or the target's greedy continuations, the
    target online in every step or its features cached once (offline); loss = `feature_weight` x SmoothL1 on
    features + the divergence on logits (`llmcompress.speculative.feature_draft`)."""
    from llmcompress.speculative.draft_init import init_draft
    from llmcompress.speculative.evaluate import prompts_from_texts
    from llmcompress.speculative.feature_draft import (FeatureDistillConfig, cache_target_sequences,
                                                       feature_speculative_decode, train_feature_draft)

    if cfg.data not in ("fixed", "target"):
        raise ValueError(f"a feature draft trains on fixed text or the target's continuations, not {cfg.data!r} "
                         "(its proposals read the target's features); use data fixed or target")
    windows = corpus.train_batches(num_samples, cfg.prompt_tokens + cfg.new_tokens)
    n_text = len(windows) if cfg.with_fixed_text else 0
    features = None
    if cfg.data == "target" or not cfg.online:
        text, seqs = windows, (windows[:, : cfg.prompt_tokens] if cfg.data == "target" else windows)
        windows, features = cache_target_sequences(target, seqs, cfg.new_tokens if cfg.data == "target" else 0,
                                                   out / "sequences", cfg.gen_batch_size or 32, progress,
                                                   cfg.gen_temperature, cfg.seed)
        if cfg.with_fixed_text:  # the windows' own text beside their continuations, in one shuffled set
            if not cfg.online:
                features = torch.cat([features, cache_target_sequences(
                    target, text, 0, out / "fixed-text", cfg.gen_batch_size or 32, progress)[1]])
            windows = torch.cat([windows, text])
        if cfg.online:
            features = None  # the sequences are kept; the target still runs inside each step
    draft = init_draft(target, init, windows[:4])
    keep = None
    if cfg.draft_vocab:
        from llmcompress.speculative.vocab import frequent_tokens, restrict_vocab, special_ids
        from llmcompress.speculative.vocab import token_counts as counts_of

        conts = windows[: len(windows) - n_text, cfg.prompt_tokens:]  # the continuations (not the added text)
        keep = frequent_tokens(counts_of(conts, target.config.vocab_size), cfg.draft_vocab,
                               special_ids(target.tokenizer))
        restrict_vocab(draft.body, keep)
    prompts = prompts_from_texts(target.tokenizer, corpus.heldout_texts, cfg.eval_prompts, cfg.prompt_tokens)

    def evaluate(d) -> dict:
        stats = DecodeStats(gamma=cfg.eval_gamma)
        for p in prompts:
            stats = stats.merge(feature_speculative_decode(target, d, p, cfg.eval_new_tokens, cfg.eval_gamma)[1])
        return {"alpha": stats.alpha, "tau": stats.tau, "acceptance_rate": stats.acceptance_rate}

    fcfg = FeatureDistillConfig(divergence=cfg.divergence, feature_weight=cfg.feature_weight, logit_weight=1.0,
                                temperature=cfg.temperature, batch_size=cfg.batch_size, lr=cfg.lr, steps=cfg.steps,
                                tokens=cfg.tokens, seconds=cfg.seconds, checkpoint_every=cfg.checkpoint_every,
                                eval_every=cfg.eval_every, seed=cfg.seed, unroll=cfg.unroll,
                                lr_schedule=cfg.lr_schedule, warmup=cfg.warmup, lr_min=cfg.lr_min)
    report = train_feature_draft(target, draft, windows, fcfg, out, evaluate, progress, features)
    for e in report["acceptance"]:
        e["tokens"] = e["step"] * cfg.batch_size * windows.shape[1]
    draft.save(out / "model")
    report |= {"init": init, "init_layers": draft.init_layers, "draft": str(out / "model"), "data": cfg.data,
               "online": cfg.online, "divergence": cfg.divergence, "draft_layers": len(draft.model.layers),
               "train_sequences": len(windows), "fixed_text_sequences": n_text, "draft_vocab": cfg.draft_vocab}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def _mean_loss(rows: list[dict]) -> float | None:
    return sum(r["loss"] for r in rows) / len(rows) if rows else None


@torch.no_grad()
def _offline_targets(target, windows: torch.Tensor, cfg: DistillConfig, cache: Path | None = None):
    """The training sequences and the top-k target log-probs at every position, read from or written to `cache`
    (a file named by what they depend on). -> ([N, S], ([N, S, k], [N, S, k]))"""
    path = None
    if cache is not None:
        ident = {k: getattr(cfg, k) for k in ("data", "gen_temperature", "seed", "prompt_tokens", "new_tokens",
                                              "offline_topk", "batch_size", "gen_batch_size")}
        h = hashlib.sha256(json.dumps(ident, sort_keys=True).encode())
        h.update(windows.cpu().contiguous().numpy().tobytes())
        h.update(json.dumps(target.config.to_dict(), sort_keys=True, default=str).encode())
        h.update(target.get_input_embeddings().weight[:64].detach().float().cpu().numpy().tobytes())
        path = Path(cache) / f"offline-targets-{h.hexdigest()[:16]}.safetensors"
        if path.is_file():
            t = load_file(str(path))
            return t["sequences"], (t["values"], t["indices"])
    device = next(target.parameters()).device
    seqs = windows
    if cfg.data == "target":  # one target-generated continuation per window, fixed for the whole run
        seqs = torch.cat([generate(target, w[:, : cfg.prompt_tokens].to(device), cfg.new_tokens,
                                   cfg.gen_temperature, cfg.seed + i).cpu()
                          for i, w in enumerate(windows.split(cfg.gen_batch_size or cfg.batch_size))])
    vals, ids = zip(*(topk_logprobs(target(b.to(device)).logits, cfg.offline_topk) for b in seqs.split(cfg.batch_size)))
    vals, ids = torch.cat(vals).cpu(), torch.cat(ids).cpu()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"sequences": seqs.contiguous(), "values": vals.contiguous(), "indices": ids.contiguous()}, str(tmp))
        tmp.rename(path)
    return seqs, (vals, ids)


@torch.no_grad()
def _eval(target, draft, prompts: list[torch.Tensor], cfg: DistillConfig, state: dict) -> dict:
    """Greedy speculative decoding on held-out prompts: alpha and tau at `eval_gamma`."""
    draft.eval()
    stats = DecodeStats(gamma=cfg.eval_gamma)
    for p in prompts[: cfg.eval_prompts]:
        stats = stats.merge(speculative_decode(target, draft, p, cfg.eval_new_tokens, cfg.eval_gamma)[1])
    return {"step": state["step"], "tokens": state["tokens"], "alpha": stats.alpha, "tau": stats.tau,
            "acceptance_rate": stats.acceptance_rate}


# ----------------------------------------------------------------------------- checkpoints (safetensors + JSON)
def _save_checkpoint(folder: Path, cfg: DistillConfig, draft, proj, opt, state: dict) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(exist_ok=True)
    names = _param_names(draft, proj)
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in names.items()}
    for n, p in names.items():
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                tensors[f"optim.{n}.{k}"] = v.detach().contiguous()
    tensors["counts"] = state["counts"]
    save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    meta = {k: v for k, v in state.items() if k != "counts"}
    (tmp / "state.json").write_text(json.dumps({"config": cfg.model_dump(), **meta}, indent=1))
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def _load_checkpoint(folder: Path, cfg: DistillConfig, draft, proj, opt) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    if _run_identity(SCHEDULE_DEFAULTS | meta["config"]) != _run_identity(cfg.model_dump()):
        raise ValueError(f"{folder} holds a run with another configuration; remove it or use another output folder")
    tensors = load_file(str(folder / "state.safetensors"))
    names = _param_names(draft, proj)
    with torch.no_grad():
        for n, p in names.items():
            p.copy_(tensors[f"model.{n}"])
            st = {k.rsplit(".", 1)[1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
            if st:
                opt.state[p] = st
    counts = tensors.get("counts", torch.zeros(draft.config.vocab_size, dtype=torch.long))
    return {k: meta[k] for k in ("step", "tokens", "history", "evals")} | {"counts": counts}


def _run_identity(config: dict) -> dict:
    """The settings a checkpoint must share to be resumed (the budget and logging cadence may change)."""
    return {k: v for k, v in config.items()
            if k not in ("steps", "tokens", "seconds", "gen_batch_size", "eval_every", "checkpoint_every",
                         "draft_vocab")}


def _param_names(draft, proj) -> dict[str, torch.nn.Parameter]:
    """Unique parameters by name (tied embeddings appear once)."""
    out = dict(draft.named_parameters())
    out |= {f"proj.{n}": p for n, p in proj.named_parameters()}
    return out


__all__ = ["DistillConfig", "continuation_mask", "distill", "expand_topk", "feature_loss", "generate", "topk_logprobs",
           "train_draft"]
