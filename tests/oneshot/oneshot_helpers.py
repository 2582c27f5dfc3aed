"""Made-up inputs and error measures for the one-shot solver tests."""

import torch


def correlated_inputs(t: int, k: int, seed: int = 0) -> torch.Tensor:
    """x: [T, K] with strongly correlated, unevenly scaled channels (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 2 * torch.randn(k, k, generator=g) / k**0.5
    scale = torch.rand(k, generator=g) * 3 + 0.1
    return (torch.randn(t, k, generator=g) @ mix) * scale


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 / x.shape[0] * x.T @ x


def rel_error(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    """||X Wᵀ - X W'ᵀ|| / ||X Wᵀ||: the layer reconstruction error."""
    return float((x @ w.T - x @ w2.T).norm() / (x @ w.T).norm())


def tiny_graph(layers: int = 2, seed: int = 0, **kw):
    """A random tiny Llama-layout ModelGraph (hidden 64, FFN 128 unless overridden)."""
    from transformers import LlamaConfig

    from llmcompress.models import build
    from llmcompress.models.loading import config_from_hf

    torch.manual_seed(seed)
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return build(config_from_hf(LlamaConfig(**(base | kw))))


def tokens(n: int = 6, s: int = 24, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, s), generator=torch.Generator().manual_seed(seed))
