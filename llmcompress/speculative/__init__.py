"""Draft models for speculative decoding: initialisation, DistillSpec training, decoding and measurement."""

from llmcompress.speculative.decode import DecodeStats, hf_assisted_decode, speculative_decode, target_decode
from llmcompress.speculative.draft_init import check_compatible, init_draft

__all__ = ["DecodeStats", "check_compatible", "hf_assisted_decode", "init_draft", "speculative_decode",
           "target_decode"]
