"""Pruning math: masks satisfy their pattern exactly; SparseGPT's OBS updates beat magnitude and Wanda."""

import pytest
import torch

from llmcompress.oneshot import magnitude_prune, parse_pattern, sparsegpt_prune, wanda_prune
from llmcompress.oneshot.calibrate import InputStats
from llmcompress.oneshot.magnitude import Pattern, keep_mask

from oneshot_helpers import rel_error

PATTERNS = ["2:4", "4:8", "1:4", "0.5", "0.7"]


def _prune(method, w, x, h, pattern):
    p = parse_pattern(pattern)
    if method == "sparsegpt":
        return sparsegpt_prune(w, h, p, blocksize=32)
    if method == "wanda":
        return wanda_prune(w, x.pow(2).sum(0), p)
    return magnitude_prune(w, p)


def test_parse_pattern():
    assert parse_pattern("2:4") == Pattern(0.5, 2, 4) and parse_pattern("2:4").is_24
    assert parse_pattern("4:8") == Pattern(0.5, 4, 8) and not parse_pattern("4:8").is_24
    assert parse_pattern("0.6") == Pattern(0.6)
    for bad, msg in [("4:2", "0 < n < m"), ("a:b", "n:m"), ("1.5", "between 0 and 1"), ("half", "neither")]:
        with pytest.raises(ValueError, match=msg):
            parse_pattern(bad)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_satisfy_pattern_exactly(method, pattern, layer_data):
    w, x, h = layer_data
    w2, keep = _prune(method, w, x, h, pattern)
    p = parse_pattern(pattern)
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert torch.equal(w2 != 0, keep)  # pruned weights are zero, kept ones are not
    if p.m:
        counts = keep.reshape(w.shape[0], -1, p.m).sum(-1)
        assert bool((counts == p.n).all())
    elif method == "magnitude":  # one threshold per layer
        assert int((~keep).sum()) == int(w.numel() * p.sparsity)
    elif method == "wanda":  # per output row
        assert bool(((~keep).sum(1) == int(w.shape[1] * p.sparsity)).all())
    else:  # SparseGPT: per block of columns
        assert int((~keep).sum()) == 4 * int(32 * 32 * p.sparsity)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "0.5"])
def test_sparsegpt_beats_magnitude_and_wanda(pattern, layer_data):
    w, x, h = layer_data
    err = {m: rel_error(x, w, _prune(m, w, x, h, pattern)[0]) for m in ("sparsegpt", "wanda", "magnitude")}
    assert err["sparsegpt"] < 0.9 * err["magnitude"], err
    assert err["sparsegpt"] < 0.9 * err["wanda"], err


def test_sparsegpt_mask_only_would_be_worse(layer_data):
    """The OBS weight update matters: SparseGPT's mask alone, without its updates, loses more."""
    w, x, h = layer_data
    w2, keep = sparsegpt_prune(w, h, parse_pattern("2:4"))
    assert rel_error(x, w, w2) < 0.8 * rel_error(x, w, w * keep)


def test_wanda_uses_input_norms():
    """A column with large inputs survives Wanda although its weights are small."""
    w = torch.tensor([[1.0, 0.9, 0.1, 0.8]])
    keep = keep_mask(w.abs() * torch.tensor([1.0, 1.0, 100.0, 1.0]), parse_pattern("2:4"))
    assert keep.tolist() == [[True, False, True, False]]
    w2, keep2 = wanda_prune(w, torch.tensor([1.0, 1.0, 1e4, 1.0]), parse_pattern("2:4"))
    assert torch.equal(keep, keep2) and w2[0, 2] == 0.1


def test_dead_inputs_and_errors(layer_data):
    w, x, _ = layer_data
    x = x.clone()
    x[:, :4] = 0  # inputs that are never nonzero
    w2, keep = sparsegpt_prune(w, 2 / len(x) * x.T @ x, parse_pattern("2:4"))
    assert torch.isfinite(w2).all() and bool((w2[:, :4] == 0).all())
    with pytest.raises(ValueError, match="multiple of m=8"):
        sparsegpt_prune(w, torch.eye(128), parse_pattern("4:8"), blocksize=4)


def test_input_stats_accumulate_the_hessian(layer_data):
    _, x, h = layer_data
    stats = InputStats(128, "cpu")
    for chunk in x.split(300):
        stats.add(chunk.reshape(3, -1, 128) if len(chunk) == 300 else chunk)
    torch.testing.assert_close(stats.H, h, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.sqnorm, x.pow(2).sum(0))
    torch.testing.assert_close(stats.absmax, x.abs().amax(0))
    assert stats.n == len(x)
