"""Profiler and cost model: table schema, variant coverage, exact sums, interpolation, errors, CLI input checks."""

import json

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.hardware import CostModel, CostTable, Entry, Timing, load_table, profile, save_table
from llmcompress.hardware.profile import (
    FFN_FRACTIONS,
    HEAD,
    ProfileSettings,
    attention_variant,
    attention_variants,
    check_clock,
    convert_linears,
    copies_for,
    decode_context,
    entry_key,
    ffn_sizes,
)
from llmcompress.models import AttentionConfig, BlockConfig, FFNConfig, LlmcNasConfig, build, count_params, set_block
from llmcompress.models.graph import blocks

runner = CliRunner()


def tiny_config(**kw):
    base = dict(vocab_size=128, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                num_hidden_layers=3, max_position_embeddings=256)
    return LlmcNasConfig(**(base | kw))


@pytest.fixture(scope="module")
def tiny_graph():
    torch.manual_seed(0)
    return build(tiny_config())


@pytest.fixture(scope="module")
def tiny_table(tiny_graph):
    return profile(tiny_graph, batches=[1, 2], prompt_len=16, gen_len=4, repeats=2, warmup=1, working_set_mb=0.5,
                   model_name="tiny")


# ----------------------------------------------------------------------------- variants (pure)
def test_variant_vocabulary():
    assert [attention_variant(a) for a in attention_variants(9, 3)] == \
        ["gqa_9q_3kv", "gqa_9q_1kv", "gqa_3q_1kv", "linear", "noop"]
    assert [attention_variant(a) for a in attention_variants(32, 8)][:5] == \
        ["gqa_32q_8kv", "gqa_32q_4kv", "gqa_16q_4kv", "gqa_32q_2kv", "gqa_8q_2kv"]
    assert ffn_sizes(1536, FFN_FRACTIONS) == [1536, 1344, 1152, 768, 384, 152]
    assert ffn_sizes(128, (0.01, 1.0)) == [128, 8]
    assert decode_context(512, 128) == 576
    assert copies_for(10 * 2**20, 600 * 2**20) == 60 and copies_for(0, 1e9) == 1 and copies_for(1, 1e9) == 256
    with pytest.raises(ValueError, match="on a GPU use the wall clock"):
        check_clock("process", torch.device("cuda"))
    if torch.get_num_threads() > 1:
        with pytest.raises(ValueError, match="use it with one thread"):
            check_clock("process", torch.device("cpu"))


# ----------------------------------------------------------------------------- profiling a tiny model
def test_profile_covers_every_variant(tiny_table):
    t = tiny_table
    expected = {f"attention:{v}:dense" for v in ("gqa_4q_2kv", "gqa_4q_1kv", "gqa_2q_1kv", "linear")}
    expected |= {f"ffn:mlp_{s}:dense" for s in (128, 112, 96, 64, 32, 16)} | {"ffn:linear:dense"}
    expected |= {"attention:noop:none", "ffn:noop:none", f"head:{HEAD}:dense"}
    assert set(t.entries) == expected and not t.skipped
    assert t.dtype == "float32" and t.settings.decode_context == 18 and t.settings.batches == [1, 2]
    for e in t.entries.values():
        assert set(e.prefill) == set(e.decode) == {1, 2}
        for timing in (*e.prefill.values(), *e.decode.values()):
            assert 0 < timing.min_ms <= timing.median_ms <= timing.max_ms and timing.samples == 2
        assert e.param_bytes == 4 * e.params  # float32, dense
    parent = t.entries["attention:gqa_4q_2kv:dense"]
    assert parent.kv_bytes_per_token == 2 * 2 * 16 * 4  # K and V, 2 KV heads, head_dim 16, 4 bytes
    assert parent.params == 2 * 64 * 64 + 2 * 32 * 64 + 64  # q, o: 64x64; k, v: 32x64; input norm
    assert t.entries["ffn:mlp_96:dense"].params == 3 * 64 * 96 + 64
    assert t.entries["attention:noop:none"].params == 0
    assert t.entries[f"head:{HEAD}:dense"].params == 2 * 128 * 64 + 64  # untied embedding + lm_head + norm


def test_predicted_memory_is_exact(tiny_graph, tiny_table):
    p = CostModel(tiny_table).predict(tiny_graph, batch=2)
    assert p["params"] == count_params(tiny_graph) and p["param_bytes"] == 4 * count_params(tiny_graph)
    assert p["kv_bytes_per_token"] == 3 * 256 and p["kv_bytes"] == 3 * 256 * 2 * (16 + 4)
    assert p["prefill_ms"] > 0 and p["decode_ms_per_token"] > 0 and p["layers"] == 3


def test_heterogeneous_graph_from_the_same_table(tiny_table):
    graph = build(tiny_config())
    set_block(graph, 0, BlockConfig(attention=AttentionConfig(num_heads=2, num_kv_heads=1), ffn=FFNConfig(kind="noop")))
    set_block(graph, 1, BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(intermediate_size=80)))
    p = CostModel(tiny_table).predict(graph)  # mlp 80 is interpolated between 64 and 96
    assert p["params"] == count_params(graph)
    assert p["kv_bytes_per_token"] == 128 + 256


def test_profile_adds_the_graphs_own_variants_and_skips_unbuildable_formats(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # the process clock needs one thread
    graph = build(tiny_config(num_hidden_layers=1))
    set_block(graph, 0, BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=2),
                                    ffn=FFNConfig(intermediate_size=72)))
    t = profile(graph, batches=[1], prompt_len=8, gen_len=2, ffn_fractions=[1.0, 0.25], formats=["dense", "int4"],
                repeats=1, warmup=0, working_set_mb=0.1, clock="process")
    assert t.settings.clock == "process"
    assert "ffn:mlp_72:dense" in t.entries and "ffn:mlp_32:int4" in t.entries
    assert t.entries["ffn:mlp_128:int4"].param_bytes < t.entries["ffn:mlp_128:dense"].param_bytes / 3
    assert "ffn:mlp_72:int4" in t.skipped and "divisible by 32" in t.skipped["ffn:mlp_72:int4"]
    with pytest.raises(ValueError, match="it was skipped"):
        CostModel(t).entry("ffn", FFNConfig(intermediate_size=72), "int4")


def test_profile_rejects_bad_arguments(tiny_graph):
    for kw, msg in [({"batches": [0]}, "batch"), ({"ffn_fractions": [1.5]}, "fractions"),
                    ({"formats": ["fp8"]}, "unknown weight format"), ({"gen_len": 0}, "gen_len")]:
        with pytest.raises(ValueError, match=msg):
            profile(tiny_graph, **kw)


# ----------------------------------------------------------------------------- the table file
def test_table_round_trip(tiny_table, tmp_path):
    path = tmp_path / "costs.json"
    save_table(tiny_table, path)
    assert load_table(path) == tiny_table
    assert json.loads(path.read_text())["entries"]["ffn:mlp_64:dense"]["decode"]["2"]["samples"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["costs.json"]  # no temporary file left
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_table(tiny_table, path)
    save_table(tiny_table, path, overwrite=True)
    data = json.loads(path.read_text())
    data["entries"]["ffn:mlp_99:dense"] = data["entries"].pop("ffn:mlp_64:dense")
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="wrong key"):
        load_table(path)
    with pytest.raises(FileNotFoundError, match="llmcompress profile"):
        load_table(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- cost model on a hand-made table
def t(ms):
    return Timing(median_ms=ms, min_ms=ms, max_ms=ms, samples=1)


def entry(part, variant, fmt, prefill, decode, params=0, kv=0):
    return Entry(part=part, variant=variant, format=fmt, params=params, param_bytes=2 * params, kv_bytes_per_token=kv,
                 prefill={1: t(prefill)}, decode={1: t(decode)})


def hand_table():
    es = [entry("head", HEAD, "dense", 10.0, 1.0, params=1000),
          entry("attention", "gqa_4q_2kv", "dense", 5.0, 0.5, params=100, kv=256),
          entry("attention", "linear", "dense", 2.0, 0.2, params=40),
          entry("attention", "noop", "none", 0.1, 0.01), entry("ffn", "noop", "none", 0.1, 0.01),
          entry("ffn", "mlp_128", "dense", 7.0, 0.7, params=300),
          entry("ffn", "mlp_64", "dense", 3.0, 0.3, params=160)]
    settings = ProfileSettings(model="hand", hidden_size=64, head_dim=16, vocab_size=128, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128, batches=[1], prompt_len=16, gen_len=4,
                               decode_context=18, formats=["dense"], ffn_fractions=[1.0, 0.5], repeats=1, warmup=0,
                               working_set_mb=1.0, threads=1, torch_version="x")
    return CostTable(device="hand", dtype="float32", settings=settings,
                     entries={entry_key(e.part, e.variant, e.format): e for e in es})


PARENT = BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=2), ffn=FFNConfig(intermediate_size=128))


def test_cost_model_sums_entries():
    cm = CostModel(hand_table())
    p = cm.predict([PARENT, PARENT])
    assert p["prefill_ms"] == pytest.approx(10 + 2 * (5 + 7 - 0.1))
    assert p["decode_ms_per_token"] == pytest.approx(1 + 2 * (0.5 + 0.7 - 0.01))
    assert p["total_ms"] == pytest.approx(p["prefill_ms"] + 4 * p["decode_ms_per_token"])
    assert p["params"] == 1000 + 2 * 400 and p["param_bytes"] == 2 * 1800
    assert p["kv_bytes_per_token"] == 512 and p["kv_bytes"] == 512 * 1 * (16 + 4)
    mixed = [BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(intermediate_size=64)),
             BlockConfig(attention=AttentionConfig(kind="linear"), ffn=FFNConfig(kind="noop")),
             BlockConfig(attention=AttentionConfig(kind="noop"), ffn=FFNConfig(kind="noop"))]
    p = cm.predict(mixed)
    assert p["prefill_ms"] == pytest.approx(10 + 3.0 + 2.0 + 0.1)
    assert p["decode_ms_per_token"] == pytest.approx(1 + 0.3 + 0.2 + 0.01)
    assert p["kv_bytes_per_token"] == 0 and p["params"] == 1200
    assert cm.predict([])["prefill_ms"] == pytest.approx(10)


def test_ffn_sizes_are_interpolated_between_profiled_ones():
    cm = CostModel(hand_table())
    e = cm.entry("ffn", FFNConfig(intermediate_size=80), "dense")  # a quarter of the way from 64 to 128
    assert e.variant == "mlp_80" and e.params == 195
    assert e.prefill[1].median_ms == pytest.approx(4.0) and e.decode[1].median_ms == pytest.approx(0.4)
    assert cm.entry("ffn", FFNConfig(intermediate_size=64), "dense").prefill[1].median_ms == 3.0
    with pytest.raises(ValueError, match=r"mlp_200.*interpolation covers 64\.\.128"):
        cm.entry("ffn", FFNConfig(intermediate_size=200), "dense")
    with pytest.raises(ValueError, match="mlp_32"):
        cm.entry("ffn", FFNConfig(intermediate_size=32), "dense")


def test_unknown_variants_and_settings_are_errors():
    cm = CostModel(hand_table())
    with pytest.raises(ValueError, match=r"gqa_4q_1kv in format dense is not in the cost table.*llmcompress profile"):
        cm.predict([BlockConfig(attention=AttentionConfig(num_heads=4, num_kv_heads=1), ffn=PARENT.ffn)])
    with pytest.raises(ValueError, match="format int4"):
        cm.predict([PARENT], fmt="int4")
    with pytest.raises(ValueError, match="batch 8 was not profiled.*--batch 1,8"):
        cm.predict([PARENT], batch=8)
    with pytest.raises(ValueError, match="prompt_len=16.*--prompt-len 512"):
        cm.predict([PARENT], prompt_len=512)


def test_predict_reads_weight_formats_from_the_graph(tiny_table):
    graph = build(tiny_config())
    convert_linears(graph.model.layers[1].mlp, "int8")
    with pytest.raises(ValueError, match="ffn variant mlp_128 in format int8"):
        CostModel(tiny_table).predict(graph)
    graph.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 128, bias=False)
    with pytest.raises(ValueError, match="mixes weight formats"):
        CostModel(tiny_table).predict(graph)
    assert [b.ffn.intermediate_size for b in blocks(graph)] == [128, 128, 128]


# ----------------------------------------------------------------------------- CLI
def assert_user_error(result, message):
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and out.startswith("error:") and message in out, result.output


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "--device 'tpu' is not cpu, cuda or cuda:N"),
    (["--batch", "1,x"], "--batch '1,x' is not a comma-separated list of int"),
    (["--batch", ","], "--batch is empty"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--ffn-fractions", "1,1.5"], "fractions must lie in (0, 1]"),
    (["--formats", "dense,fp8"], "choose from dense"),
    (["--dtype", "float8"], "--dtype 'float8' is not one of"),
    (["--repeats", "0"], "must be at least 1"),
    (["--clock", "cycles"], "--clock 'cycles': use wall, or process with --device cpu"),
])
def test_cli_bad_input(args, message, tmp_path):
    assert_user_error(runner.invoke(app, ["profile", "--out", str(tmp_path / "c.json"), *args]), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cli_cuda_without_cuda(tmp_path):
    assert_user_error(runner.invoke(app, ["profile", "--device", "cuda", "--out", str(tmp_path / "c.json")]),
                      "CUDA is not available here")


def test_cli_existing_out_needs_overwrite(tmp_path):
    out = tmp_path / "c.json"
    out.write_text("{}")
    assert_user_error(runner.invoke(app, ["profile", "--out", str(out)]), "already exists; pass --overwrite")
    assert out.read_text() == "{}"


def test_cli_profiles_a_model(tiny_hf_dir, tmp_path):
    out = tmp_path / "c.json"
    r = runner.invoke(app, ["profile", "--model", str(tiny_hf_dir), "--batch", "1,2", "--prompt-len", "8",
                            "--gen-len", "2", "--ffn-fractions", "1,0.5", "--repeats", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    table = load_table(out)
    assert table.settings.batches == [1, 2] and "ffn:mlp_48:dense" in table.entries
    out = " ".join(r.output.split())
    assert "predicted for the model at batch 2: prefill" in out and "gqa_4q_1kv" in out, r.output


def test_measure_model_times_only_the_requested_metrics(tiny_graph):
    from llmcompress.hardware import measure_model

    t = measure_model(tiny_graph, prompt_len=8, gen_len=2, repeats=1, warmup=0, metrics=("decode",))
    assert set(t) == {"decode"} and t["decode"].samples == 1
    assert set(measure_model(tiny_graph, prompt_len=8, gen_len=2, repeats=1, warmup=0)) == {"prefill", "decode"}
    with pytest.raises(ValueError, match="unknown metrics"):
        measure_model(tiny_graph, prompt_len=8, gen_len=2, metrics=("throughput",))


def test_measure_speedup_pairs_the_two_models():
    from llmcompress.hardware import measure_speedup

    torch.manual_seed(0)
    deep = build(tiny_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=8))
    shallow = build(tiny_config(hidden_size=256, intermediate_size=1024, num_hidden_layers=1))
    r = measure_speedup(deep, shallow, "prefill", prompt_len=64, rounds=3)
    assert r["rounds"] == 3 and len(r["ratios"]) == 3
    assert r["speedup"] == sorted(r["ratios"])[1]  # the median ratio, not the ratio of medians
    assert r["speedup"] > 1.5  # 8 layers against 1: the ratio's direction is reference / model
    with pytest.raises(ValueError, match="at least one round"):
        measure_speedup(deep, shallow, rounds=0)
    with pytest.raises(ValueError, match="not a latency"):
        measure_speedup(deep, shallow, metric="throughput")
