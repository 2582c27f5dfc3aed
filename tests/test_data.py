"""Data sources, packing, splitting and synthetic text from the teacher."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmcompress.data import Corpus, DataConfig, pack, read_texts, split_rows, token_stream


def test_read_jsonl_txt_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "one"}\n\n{"body": "two"}\n')
    assert read_texts(str(tmp_path / "a.jsonl"), field="body") == ["one", "two"]
    (tmp_path / "a.txt").write_text("first doc\nstill first\n\nsecond doc\n")
    assert read_texts(str(tmp_path / "a.txt")) == ["first doc\nstill first", "second doc"]
    pq.write_table(pa.table({"content": ["x y", "z"]}), tmp_path / "a.parquet")
    assert read_texts(str(tmp_path / "a.parquet"), field="content") == ["x y", "z"]


def test_relative_path_resolves_against_base_dir(tmp_path):
    (tmp_path / "rel.jsonl").write_text('{"text": "hello"}\n')
    assert read_texts("rel.jsonl", base_dir=tmp_path) == ["hello"]


@pytest.mark.parametrize("content, name, field, message", [
    ('{"text": "a"}\n', "x.jsonl", "body", "no field 'body'"),
    ("not json\n", "x.jsonl", "text", "not valid JSON"),
    ("", "x.jsonl", "text", "has no text"),
    ("   \n\n  ", "x.txt", "text", "has no text"),
    ("a", "x.csv", "text", "unsupported data file type"),
])
def test_bad_files(tmp_path, content, name, field, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=message):
        read_texts(str(tmp_path / name), field=field)


def test_missing_file_and_offline_hub(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_texts(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="offline"):
        read_texts("hf:some-org/some-dataset-that-is-not-here")


def test_split_and_pack_are_deterministic():
    train, held = split_rows(list("abcdefghij"), 3)
    assert train == list("abcdefg") and held == list("hij")
    with pytest.raises(ValueError, match="leaves no training text"):
        split_rows(["a"], 1)
    stream = torch.arange(103)
    a, b = pack(stream, 10, 5, seed=1), pack(stream, 10, 5, seed=1)
    assert a.shape == (5, 10) and torch.equal(a, b)
    assert not torch.equal(pack(stream, 10, None, seed=2), pack(stream, 10, None, seed=1))
    # windows are whole, non-overlapping slices of the stream
    assert sorted(w[0].item() for w in pack(stream, 10, None, seed=3)) == list(range(0, 100, 10))
    assert torch.equal(pack(stream, 10, 2, seed=None), stream[:20].view(2, 10))
    with pytest.raises(ValueError, match="not enough"):
        pack(torch.arange(5), 10)


def test_token_stream_joins_with_eos(tokenizer):
    s = token_stream(tokenizer, ["the fox", "a dog"])
    assert (s == tokenizer.eos_token_id).sum() == 2 and s[-1] == tokenizer.eos_token_id


def test_corpus_from_file(tokenizer, corpus_file):
    c = Corpus(DataConfig(source=str(corpus_file), heldout_rows=10, seq_len=32, num_samples=4), tokenizer)
    assert len(c.train_texts) == 50 and len(c.heldout_texts) == 10
    batches = c.train_batches()
    assert batches.shape == (4, 32) and batches.dtype == torch.long
    held = c.heldout_stream()
    train = token_stream(tokenizer, c.train_texts)
    assert held.numel() > 32 and train.numel() > held.numel()


def test_data_config_rejects_unknown_keys():
    with pytest.raises(ValueError):
        DataConfig(source="x.jsonl", sequence_length=5)


def test_synthetic_data_is_seeded_and_cached(tiny_hf_dir, tmp_path):
    from llmcompress.models import load

    g = load(str(tiny_hf_dir))
    cfg = DataConfig(source="synthetic", synthetic_rows=4, synthetic_tokens=16, heldout_rows=1, seq_len=8)
    a = Corpus(cfg, g.tokenizer, teacher=g, cache=tmp_path)
    files = list((tmp_path / "synthetic").glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 4
    files[0].write_text("".join(json.dumps({"text": f"cached {i}"}) + "\n" for i in range(4)))
    b = Corpus(cfg, g.tokenizer, teacher=g, cache=tmp_path)  # read back from the cache, not resampled
    assert b.train_texts == ["cached 0", "cached 1", "cached 2"]
    fresh = Corpus(cfg, g.tokenizer, teacher=g, cache=tmp_path / "other")
    assert fresh.train_texts + fresh.heldout_texts == a.train_texts + a.heldout_texts  # same seed, same text
    with pytest.raises(ValueError, match="no model"):
        Corpus(cfg, g.tokenizer)
