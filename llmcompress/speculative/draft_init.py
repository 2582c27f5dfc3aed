"""Initial drafts: the target with fewer layers (through the model graph), or another model sharing its tokenizer.

Init specs (CLI `--init`, recipe `init:`):
  layers:K     keep K evenly spaced layers of the target, always the first and the last
  important:K  keep the K layers whose single removal changes the target's next-token distribution most
               (layer-removal KL on calibration tokens, `llmcompress.prune.layers`)
  feature:K    a feature draft (EAGLE-style, `llmcompress.speculative.feature_draft`): copies of the target's
               last K layers reading the target's features (calibration tokens balance its input); a folder
               holding a trained one loads it
  anything else is a model spec for `llmcompress.models.load` ('default', a folder, a .gguf, a hub id)
"""

from __future__ import annotations

import copy

from pathlib import Path

import torch

from llmcompress.models import load, remove_layers


def evenly_spaced(n_layers: int, k: int) -> list[int]:
    """K of n layer indices spread evenly, the first and the last included (k = 1 keeps the first)."""
    if not 1 <= k <= n_layers:
        raise ValueError(f"cannot keep {k} of {n_layers} layers; choose 1..{n_layers}")
    if k == 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (k - 1)) for i in range(k)})


def most_important(scores: torch.Tensor, k: int) -> list[int]:
    """The k layers with the largest removal score (KL of the model without the layer). scores: [L]"""
    if not 1 <= k <= len(scores):
        raise ValueError(f"cannot keep {k} of {len(scores)} layers; choose 1..{len(scores)}")
    return sorted(torch.argsort(scores, descending=True)[:k].tolist())


def keep_layers(target, keep: list[int]):
    """A new graph: a copy of `target` with only the layers `keep` (weights copied, not shared)."""
    draft = copy.deepcopy(target)
    remove_layers(draft, [i for i in range(len(target.model.layers)) if i not in set(keep)])
    return draft


def check_compatible(target, draft) -> None:
    """Refuse a draft whose vocabulary or tokenizer differs from the target's (ValueError saying what differs)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"draft vocabulary has {dv} entries but the target's has {tv}; a draft must share the "
                         "target's tokenizer (use the target's family, or init the draft from it, e.g. layers:6)")
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is None or dt is None:
        return
    tvocab, dvocab = tt.get_vocab(), dt.get_vocab()
    if tvocab != dvocab:
        diff = sorted(set(tvocab.items()) ^ set(dvocab.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(f"draft tokenizer differs from the target's ({len(dvocab)} vs {len(tvocab)} tokens; "
                         f"first differences {diff}); a draft must share the target's tokenizer")
    for name in ("bos_token_id", "eos_token_id"):
        if getattr(tt, name) != getattr(dt, name):
            raise ValueError(f"draft tokenizer's {name} is {getattr(dt, name)} but the target's is "
                             f"{getattr(tt, name)}; a draft must share the target's tokenizer")


def init_draft(target, spec: str, calib_tokens: torch.Tensor | None = None, dtype: torch.dtype | None = None):
    """Build the initial draft named by `spec` (see the module doc); the result shares the target's tokenizer."""
    kind, _, arg = spec.partition(":")
    from llmcompress.speculative.feature_draft import FEATURE_FILE, FeatureDraft

    if kind == "feature":
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"draft init {spec!r}: write feature:K with K a number of layers, e.g. "
                             "feature:1") from None
        n = len(target.model.layers)
        if not 1 <= k <= n:
            raise ValueError(f"draft init {spec!r}: a feature draft keeps 1..{n} of the target's last layers")
        return FeatureDraft.from_target(target, list(range(n - k, n)), calib_tokens)
    if Path(spec).is_dir() and (Path(spec) / FEATURE_FILE).is_file():
        return FeatureDraft.load(target, spec)
    if kind in ("layers", "important"):
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"draft init {spec!r}: write {kind}:K with K a number of layers, e.g. {kind}:6") from None
        n = len(target.model.layers)
        if kind == "layers":
            keep = evenly_spaced(n, k)
        else:
            if calib_tokens is None:
                raise ValueError("draft init 'important:K' scores layers on calibration text; none was given")
            from llmcompress.prune.layers import layer_removal_kl

            keep = most_important(layer_removal_kl(target, calib_tokens), k)
        draft = keep_layers(target, keep)
        draft.init_layers = keep  # which target layers the draft kept (reports)
    else:
        ref = next(target.parameters())
        draft = load(spec, dtype=dtype or ref.dtype, device=str(ref.device))
        check_compatible(target, draft)
        from llmcompress.speculative.vocab import load_vocab, restrict_vocab

        keep = load_vocab(spec) if Path(spec).is_dir() else None
        if keep is not None:  # the draft was saved with a frequent-token head
            restrict_vocab(draft, keep)
    draft.tokenizer = getattr(target, "tokenizer", None) or getattr(draft, "tokenizer", None)
    return draft.eval()


__all__ = ["check_compatible", "evenly_spaced", "init_draft", "keep_layers", "most_important"]
