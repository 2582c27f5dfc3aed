"""Model graph, loading and deployable checkpoints."""

from llmcompress.models.graph import (
    AttentionConfig,
    BlockConfig,
    FFNConfig,
    ModelGraph,
    blocks,
    build,
    count_params,
    layer_table,
    remove_layers,
    set_block,
)
from llmcompress.models.loading import load, save
from llmcompress.models.modeling_llmcompress import LlmcNasConfig

__all__ = [
    "AttentionConfig", "BlockConfig", "FFNConfig", "LlmcNasConfig", "ModelGraph", "blocks", "build",
    "count_params", "layer_table", "load", "remove_layers", "save", "set_block",
]
