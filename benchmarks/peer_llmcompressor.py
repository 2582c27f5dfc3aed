"""The peer of benchmarks/sparsity_quant.py: llm-compressor's `oneshot` on the same model and samples.

Runs with the peer's own virtualenv (bash benchmarks/peer_setup.sh), never with ours, and imports
nothing of llmcompress. It reads the dense model as a plain Llama folder and the calibration token ids
that our side uses (safetensors, input_ids [N, S]), compresses, saves the compressed-tensors checkpoint
and writes a JSON result (oneshot seconds, versions, how much of the 2:4 pattern the weights keep).
Perplexity is measured afterwards by the driver, with our protocol, from the saved checkpoint.
  /tmp/peer-venv/bin/python benchmarks/peer_llmcompressor.py --method sparsegpt_24 --model DIR \
      --calib calib.safetensors --out DIR --result result.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

METHODS = ("sparsegpt_24", "wanda_24", "gptq_w4a16", "w8a8", "sparsegpt_24_gptq_w4a16")


def recipe(method: str, group_size: int, smoothing: float | None, dampening: float):
    """The llm-compressor modifiers of a method (lm_head is left dense, as on our side)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    ignore = ["lm_head"]
    sparse = dict(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=ignore)
    w4 = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    if method == "sparsegpt_24":
        return [SparseGPTModifier(**sparse, dampening_frac=dampening)]
    if method == "wanda_24":
        return [WandaPruningModifier(**sparse)]
    if method == "gptq_w4a16":
        return [GPTQModifier(config_groups={"group_0": w4}, ignore=ignore, dampening_frac=dampening)]
    if method == "w8a8":
        smooth = [SmoothQuantModifier(smoothing_strength=smoothing)] if smoothing is not None else []
        return smooth + [GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=ignore, dampening_frac=dampening)]
    return [SparseGPTModifier(**sparse, dampening_frac=dampening),
            GPTQModifier(config_groups={"group_0": w4}, ignore=ignore, dampening_frac=dampening)]


def kept_24(model) -> float:
    """Fraction of groups of 4 weights (along the input axis, decoder linears) with at most 2 nonzeros."""
    import torch

    ok = total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            w = m.weight.detach()
            g = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
            ok, total = ok + int((g <= 2).sum()), total + g.numel()
    return ok / max(total, 1)


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; getrusage's ru_maxrss would include the parent's after fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--model", required=True, help="dense Llama folder (config.json + safetensors)")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids [N, S]")
    ap.add_argument("--out", required=True, help="checkpoint folder to write")
    ap.add_argument("--result", required=True, help="JSON result file to write")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--smoothing", type=float, default=None, help="w8a8: SmoothQuant strength")
    ap.add_argument("--dampening", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = load_file(args.calib)["input_ids"]  # [N, S]
    n, s = ids.shape
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe(args.method, args.group_size, args.smoothing, args.dampening),
            num_calibration_samples=n, max_seq_length=s, shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    kept = kept_24(model) if "24" in args.method else None
    model.save_pretrained(args.out, save_compressed=True)
    result = {
        "method": args.method, "oneshot_s": seconds, "process_s": time.perf_counter() - t_start,
        "peak_rss_mb": peak_rss_mb(),
        "calibration": f"{n} sequences of {s} tokens", "group_size": args.group_size, "smoothing": args.smoothing,
        "dampening": args.dampening, "threads": torch.get_num_threads(), "kept_24_fraction": kept,
        "versions": {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
                     "transformers": transformers.__version__, "torch": torch.__version__},
    }
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
