"""Calibration, training and held-out token data.

Sources: a local `.txt` (one document per blank-line-separated paragraph), `.jsonl` or `.parquet` file
(text field configurable), a Hugging Face dataset (`hf:NAME[:CONFIG]`, when the hub is reachable), or
`synthetic` (text sampled from the teacher itself, seeded and cached).
Documents are split by row into train and held-out parts, tokenized, joined with EOS and packed
into fixed windows; the window order is a seeded shuffle, so the same config gives the same batches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    """Where tokens come from and how they are cut. These fields are the recipe's `data:` section."""

    model_config = ConfigDict(extra="forbid")
    source: str = Field("synthetic", description="file path, hf:NAME[:CONFIG], or synthetic")
    field: str = Field("text", description="text field of .jsonl/.parquet rows or HF datasets")
    split: str = Field("train", description="split of a Hugging Face dataset")
    heldout_rows: int = Field(200, ge=0, description="the last N documents are held out for evaluation")
    max_rows: int | None = Field(None, gt=0, description="use only the first N documents (before the split)")
    seq_len: int = Field(512, gt=1, description="tokens per packed sequence")
    num_samples: int = Field(128, gt=0, description="calibration/training sequences to draw")
    seed: int = 0
    synthetic_rows: int = Field(64, gt=0, description="documents to sample when source is synthetic")
    synthetic_tokens: int = Field(256, gt=0, description="tokens per sampled document")
    synthetic_temperature: float = Field(1.0, gt=0)


# ----------------------------------------------------------------------------- reading documents
def read_texts(source: str, field: str = "text", split: str = "train", base_dir: Path | None = None) -> list[str]:
    """All documents of a file or Hugging Face dataset, in order."""
    if source.startswith("hf:"):
        return _read_hf(source[3:], field, split)
    path = Path(source).expanduser()
    if base_dir is not None and not path.is_absolute() and not path.exists():
        path = base_dir / path
    if not path.exists():
        raise ValueError(f"data file {path} does not exist; pass a .txt/.jsonl/.parquet file, hf:NAME or synthetic")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    elif suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n} is not valid JSON ({err.msg})") from None
            if field not in row:
                raise ValueError(f"{path}:{n} has no field {field!r} (fields: {', '.join(row)}); set data.field")
            texts.append(str(row[field]))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if field not in table.column_names:
            raise ValueError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)}); set data.field")
        texts = [str(t) for t in table.column(field).to_pylist()]
    else:
        raise ValueError(f"unsupported data file type {suffix!r}; use .txt, .jsonl or .parquet")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"data file {path} has no text")
    return texts


def _read_hf(name: str, field: str, split: str) -> list[str]:
    import datasets

    ds_name, _, cfg = name.partition(":")
    try:
        ds = datasets.load_dataset(ds_name, cfg or None, split=split)
    except Exception as err:  # offline / unknown dataset: many exception types, one meaning
        raise ValueError(
            f"could not load Hugging Face dataset {name!r} ({type(err).__name__}); offline, use a local "
            ".txt/.jsonl/.parquet file or 'synthetic'"
        ) from None
    if field not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no column {field!r} (columns: {', '.join(ds.column_names)})")
    texts = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"dataset {name!r} has no text in column {field!r}")
    return texts


def split_rows(texts: list[str], heldout_rows: int) -> tuple[list[str], list[str]]:
    """(train, held-out): the last `heldout_rows` documents are held out."""
    if heldout_rows >= len(texts):
        raise ValueError(f"heldout_rows={heldout_rows} leaves no training text out of {len(texts)} documents")
    cut = len(texts) - heldout_rows
    return texts[:cut], texts[cut:]


# ----------------------------------------------------------------------------- tokens
def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized and joined by EOS. -> [T]"""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for ids_doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(ids_doc)
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(stream: torch.Tensor, seq_len: int, num_samples: int | None = None, seed: int | None = 0) -> torch.Tensor:
    """Cut a token stream into non-overlapping windows; seeded shuffle; at most `num_samples`. -> [N, seq_len]"""
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"only {stream.numel()} tokens: not enough for one sequence of {seq_len}; "
                         "use more data or a shorter seq_len")
    windows = stream[: n * seq_len].view(n, seq_len)
    if seed is not None:
        windows = windows[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    return windows[:num_samples] if num_samples else windows


class Corpus:
    """The documents of a `DataConfig`, split into train and held-out parts."""

    def __init__(self, cfg: DataConfig, tokenizer, teacher=None, base_dir: Path | None = None, cache: Path | None = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        if cfg.source == "synthetic":
            if teacher is None:
                raise ValueError("data.source 'synthetic' samples text from the teacher, but no model was given")
            texts = synthesize(teacher, tokenizer, cfg.synthetic_rows, cfg.synthetic_tokens,
                               cfg.synthetic_temperature, cfg.seed, cache)
        else:
            texts = read_texts(cfg.source, cfg.field, cfg.split, base_dir)
        if cfg.max_rows:
            texts = texts[: cfg.max_rows]
        heldout = min(cfg.heldout_rows, len(texts) // 2) if cfg.source == "synthetic" else cfg.heldout_rows
        self.train_texts, self.heldout_texts = split_rows(texts, heldout)

    def train_batches(self, num_samples: int | None = None, seq_len: int | None = None) -> torch.Tensor:
        """Calibration/training sequences from the train part. -> [N, seq_len]"""
        stream = token_stream(self.tokenizer, self.train_texts)
        return pack(stream, seq_len or self.cfg.seq_len, num_samples or self.cfg.num_samples, self.cfg.seed)

    def heldout_stream(self) -> torch.Tensor:
        if not self.heldout_texts:
            raise ValueError("no held-out documents; set data.heldout_rows > 0")
        return token_stream(self.tokenizer, self.heldout_texts)

    def describe(self) -> str:
        return (f"{self.cfg.source}: {len(self.train_texts)} train / {len(self.heldout_texts)} held-out documents")


# ----------------------------------------------------------------------------- synthetic data
def synthesize(model, tokenizer, rows: int, tokens: int, temperature: float, seed: int,
               cache: Path | None = None, batch_size: int = 16) -> list[str]:
    """Documents sampled from `model` itself, starting from BOS; seeded, cached as JSONL."""
    key = hashlib.sha256(json.dumps([getattr(model, "source", ""), _fingerprint(model), rows, tokens,
                                     temperature, seed]).encode()).hexdigest()[:16]
    path = cache / "synthetic" / f"{key}.jsonl" if cache else None
    if path is not None and path.exists():
        return [json.loads(line)["text"] for line in path.read_text().splitlines()]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    texts: list[str] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for i in range(0, rows, batch_size):
            n = min(batch_size, rows - i)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                 min_new_tokens=tokens, pad_token_id=tokenizer.eos_token_id)
            texts.extend(tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.rename(path)
    return texts


def _fingerprint(model) -> str:
    h = hashlib.sha256()
    for _, p in list(model.named_parameters())[:4]:
        h.update(p.detach().float().flatten()[:1024].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = ["Corpus", "DataConfig", "pack", "read_texts", "split_rows", "synthesize", "token_stream"]
