"""A draft that proposes from a subset of the vocabulary: a cheaper LM head, still lossless.

On a small model the LM head dominates the draft's cost (SmolLM2: 49152 x 576 = 28M weights, as many as
eight decoder layers), yet the tokens a target actually emits on a task come from a few thousand ids.
Restricting the draft's head to the K most frequent ids (FR-Spec, Zhao et al. 2025) cuts that matmul by
V / K. The draft's distribution q is then zero outside the subset; speculative sampling stays exact for any
q (a token outside the subset is simply never proposed and comes from the residual or the bonus token), so
only the acceptance rate can change: it drops by the target mass that falls outside the subset.

`SubsetHead` computes the K logits and writes them into a full-vocabulary row filled with the dtype's
lowest value, so every caller (sampling, verification, divergences) keeps seeing [.., V] logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from llmcompress.models.cpu_linear import needs_grad, packed_linear
from llmcompress.models.modeling_llmcompress import head_linear


def token_counts(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each id occurs in `tokens` (any shape). -> [V] int64"""
    flat = tokens.reshape(-1).long()
    if flat.numel() and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}); got {int(flat.min())}..{int(flat.max())}")
    return torch.bincount(flat, minlength=vocab_size)


def frequent_tokens(counts: torch.Tensor, k: int, always: Iterable[int] = ()) -> torch.Tensor:
    """The ids of the `k` most frequent tokens (ties broken by lower id), `always` included first (special
    tokens: end of turn, end of text). counts: [V] -> [k] sorted ascending"""
    vocab = counts.numel()
    if not 1 <= k <= vocab:
        raise ValueError(f"draft vocabulary of {k} tokens: choose 1..{vocab} (the model's vocabulary size)")
    forced = sorted({int(t) for t in always if 0 <= int(t) < vocab})
    if len(forced) > k:
        raise ValueError(f"draft vocabulary of {k} tokens cannot hold the {len(forced)} special tokens; use more")
    score = counts.double().clone()
    score[forced] = float("inf")
    # stable descending sort: equal counts keep ascending id order
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:k].sort().values


class SubsetHead(torch.nn.Module):
    """LM head over the ids `keep` only, returning full-vocabulary logits (the rest at the dtype's minimum)."""

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        # weight: [V, D]; keep: [K] sorted ids
        self.vocab_size = weight.shape[0]
        self.register_buffer("keep", keep.to(device=weight.device, dtype=torch.long))
        self.weight = torch.nn.Parameter(weight.detach()[self.keep].clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach()[self.keep].clone())
        self.packed = None  # a oneDNN copy of the weight while inside `cpu_linear.packed_linears`

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not needs_grad(h, self.weight):
            sub = packed_linear(h, self.packed, self.weight.shape[0], self.bias)  # h: [..., D] -> [..., K]
        else:
            sub = head_linear(h, self.weight, self.bias)
        out = sub.new_full((*sub.shape[:-1], self.vocab_size), torch.finfo(sub.dtype).min)  # [..., V]
        return out.index_copy_(-1, self.keep, sub)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[1]} -> {self.weight.shape[0]} of {self.vocab_size} ids"


def restrict_vocab(draft, keep: torch.Tensor):
    """Give `draft` (in place) an LM head over the ids `keep`; returns the draft. Its input embeddings are
    untouched (the draft still reads any token the target emits)."""
    if hasattr(draft, "body"):  # a feature draft: the head is its body's
        restrict_vocab(draft.body, keep)
        return draft
    head = draft.get_output_embeddings()
    if isinstance(head, SubsetHead):
        raise ValueError("the draft's vocabulary is already restricted; restrict the original draft")
    keep = torch.as_tensor(keep, dtype=torch.long)
    if keep.numel() == 0 or keep.min() < 0 or keep.max() >= head.weight.shape[0]:
        raise ValueError(f"draft vocabulary ids must lie in [0, {head.weight.shape[0]}) and not be empty")
    draft.lm_head = SubsetHead(head.weight, keep.unique(), getattr(head, "bias", None))
    draft.draft_vocab = draft.lm_head.keep
    return draft


def special_ids(tokenizer) -> list[int]:
    """Ids a draft must always be able to propose: the tokenizer's special tokens (end of turn, end of text)."""
    if tokenizer is None:
        return []
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            ids.add(value)
    return sorted(ids)


def head_mass(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean probability mass the distributions `logits` put on the ids `keep`: the acceptance a draft keeps
    at best after restriction. logits: [..., V] -> scalar"""
    return torch.softmax(logits.float(), dim=-1)[..., keep].sum(-1).mean()


VOCAB_FILE = "draft_vocab.json"


def save_vocab(folder: str | Path, keep: torch.Tensor, vocab_size: int, source: str) -> Path:
    """Store a draft's proposal ids next to its checkpoint (`draft_vocab.json`: ids, vocabulary size, where the
    frequencies came from); `init_draft` applies it when it loads the folder."""
    path = Path(folder) / VOCAB_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"vocab_size": vocab_size, "source": source, "ids": [int(i) for i in keep]}))
    tmp.rename(path)
    return path


def load_vocab(folder: str | Path) -> torch.Tensor | None:
    """The ids stored by `save_vocab` in a draft folder, or None when it holds none. -> [K]"""
    path = Path(folder) / VOCAB_FILE
    if not path.is_file():
        return None
    try:
        return torch.tensor(json.loads(path.read_text())["ids"], dtype=torch.long)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a draft vocabulary (a JSON object with an 'ids' list): {e}") from None


__all__ = ["SubsetHead", "load_vocab", "save_vocab", "frequent_tokens", "head_mass", "restrict_vocab", "special_ids", "token_counts"]
