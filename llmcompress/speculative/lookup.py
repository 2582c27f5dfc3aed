"""Proposals looked up in the context itself (prompt lookup decoding, Saxena 2023; transformers'
`prompt_lookup_num_tokens`), alone or beside a draft model.

A model that summarises, answers from a document or edits code copies spans of its prompt. When the last n
tokens of the sequence occurred earlier in it, the tokens that followed them there are a free proposal: no
draft model runs. The decoders (`decode.speculative_decode`, `feature_draft.feature_speculative_decode`) take
a `LookupConfig`: in each round a match of at least `min_ngram` tokens proposes up to `tokens` tokens, and
without one the draft model drafts as usual (or, with no draft model, the target takes a plain step). The
target verifies a looked-up proposal like a drafted one, as a draft whose distribution is one-hot on it
(accepted with probability p(x); at a rejection the next token comes from norm(max(0, p - onehot(x)))), so
decoding stays exact in greedy and in sampling mode.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LookupConfig(BaseModel):
    """Where proposals come from the context (the `lookup` fields of speculative evaluation)."""

    model_config = ConfigDict(extra="forbid")
    max_ngram: int = Field(3, ge=1, le=16, description="the longest suffix n-gram searched for in the context")
    min_ngram: int = Field(2, ge=1, le=16, description="shorter matches propose nothing (1 matches often and "
                           "is right less often)")
    tokens: int = Field(6, ge=1, le=64, description="tokens proposed after a match")

    @model_validator(mode="after")
    def _order(self):
        if self.min_ngram > self.max_ngram:
            raise ValueError(f"lookup min_ngram={self.min_ngram} exceeds max_ngram={self.max_ngram}; "
                             "give min_ngram <= max_ngram")
        return self


def lookup_proposal(context: list[int], max_ngram: int, min_ngram: int, k: int) -> list[int]:
    """The tokens that followed the latest earlier occurrence of the longest suffix of `context` of
    max_ngram..min_ngram tokens, at most k of them; [] without a match.

    The suffix itself is not a match; an occurrence overlapping it is (a repeating pattern continues)."""
    size = len(context)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        pattern = context[size - n:]
        first = pattern[0]
        for start in range(size - n - 1, -1, -1):  # latest first: recent text predicts best
            if context[start] == first and context[start:start + n] == pattern:
                return context[start + n:start + n + k]
    return []


__all__ = ["LookupConfig", "lookup_proposal"]
