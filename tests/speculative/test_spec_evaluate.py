"""The speculative-decoding report and `llmcompress eval --draft`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from llmcompress.cli import app
from llmcompress.models.cpu_linear import onednn_available
from llmcompress.speculative.draft_init import init_draft
from llmcompress.speculative.evaluate import SpecEvalConfig, evaluate_speculative, instruction_prompts, parse_gammas


@pytest.mark.parametrize("cpu_linear", ["auto", "torch"])
def test_report_fields(tiny_target, cpu_linear):
    draft = init_draft(tiny_target, "layers:2")
    cfg = SpecEvalConfig(gammas=[1, 3], prompts=2, new_tokens=6, cost_steps=4, compare_hf=True, cpu_linear=cpu_linear)
    r = evaluate_speculative(tiny_target, draft, [torch.tensor([[5, 6, 7]]), torch.tensor([[9, 10]])], cfg)
    assert r["cpu_linear"] == ("onednn" if cpu_linear == "auto" and onednn_available() else "torch")
    assert type(tiny_target.lm_head) is torch.nn.Linear  # the packed modules are gone again
    assert 0 < r["cost_ratio_c"] and r["prompts"] == 2 and [g["gamma"] for g in r["gammas"]] == [1, 3]
    for g in r["gammas"]:
        assert g["identical_output"] and 1 <= g["tau"] <= g["gamma"] + 1 and 0 <= g["alpha"] <= 1
        assert g["predicted_speedup"] > 0 and g["measured_speedup"] > 0 and g["new_tokens"] == 12
        assert g["hf_identical_output"] and g["hf_measured_speedup"] > 0  # transformers' assisted decoding agrees
    json.dumps(r)  # JSON-ready


def test_parse_gammas():
    assert parse_gammas("1, 2,4") == [1, 2, 4]
    for bad in ("", "0,1", "a"):
        with pytest.raises(ValueError, match="--gammas"):
            parse_gammas(bad)


def test_cli_eval_draft(tiny_hf_dir, corpus_file, tmp_path):
    runner = CliRunner()
    report = tmp_path / "r.json"
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file),
                            "--heldout-rows", "10", "--draft", "layers:2", "--gammas", "1,3", "--spec-prompts", "2",
                            "--spec-new-tokens", "5", "--report", str(report)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report.read_text())["speculative"]
    assert spec["draft"] == "layers:2" and spec["draft_init_layers"] == [0, 3] and len(spec["gammas"]) == 2
    assert "speed-up" in r.output and "identical" in r.output and "kept" in r.output
    assert [len(g["acceptance_by_position"]) for g in spec["gammas"]] == [1, 3]
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--draft", "layers:2",
                            "--gammas", "0"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "--gammas" in r.output
    report2 = tmp_path / "r2.json"
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--data", str(corpus_file),
                            "--heldout-rows", "10", "--draft", "layers:2", "--gammas", "3", "--spec-prompts", "1",
                            "--spec-new-tokens", "5", "--draft-stop", "0.5", "--cpu-linear", "torch",
                            "--report", str(report2)])
    assert r.exit_code == 0, r.output
    spec = json.loads(report2.read_text())["speculative"]
    assert spec["draft_stop"] == 0.5 and spec["cpu_linear"] == "torch" and "below 0.5" in spec["protocol"]
    r = runner.invoke(app, ["eval", str(tiny_hf_dir), "--no-perplexity", "--no-speed", "--draft", "layers:2",
                            "--cpu-linear", "mkl"])
    assert r.exit_code == 2 and r.output.startswith("error:") and "cpu_linear" in r.output, r.output


class _CharTokenizer:
    """One token per character; the chat frame is '<u>' + content + '</u><a>'."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "<u>" + messages[0]["content"] + "</u><a>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_instruction_prompts_frame_consecutive_pieces_of_each_document():
    tok, frame = _CharTokenizer(), len("<u>S: </u><a>")
    docs = ["a" * 20 + "b" * 20 + "c" * 5, "d" * 10, "e" * 20]  # the 10-token document is too short
    one = instruction_prompts(tok, docs, 10, frame + 20, instruction="S: ")
    text = lambda row: "".join(map(chr, row.tolist()))  # noqa: E731
    assert [text(r)[6:26] for r in one] == ["a" * 20, "e" * 20]  # each document's first piece
    two = instruction_prompts(tok, docs, 10, frame + 20, instruction="S: ", per_doc=2)
    assert [text(r)[6:26] for r in two] == ["a" * 20, "b" * 20, "e" * 20]  # the 5-token tail is no piece
    assert text(two[1]) == "<u>S: " + "b" * 20 + "</u><a>" and two.shape == (3, frame + 20)
    assert len(instruction_prompts(tok, docs, 2, frame + 20, instruction="S: ", per_doc=2)) == 2
    with pytest.raises(ValueError, match="per_doc"):
        instruction_prompts(tok, docs, 2, frame + 20, per_doc=0)
