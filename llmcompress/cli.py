"""The `llmcompress` command line: parses, calls the Python API, renders with rich."""

from __future__ import annotations

import json
import logging
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress LLMs into smaller, faster, deployable ones, with numbers that prove it.")
console = Console(stderr=True)
out_console = Console()


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 2."""


@contextmanager
def user_errors():
    """Turn the library's user-facing errors into one line on stderr and exit code 2."""
    from pydantic import ValidationError

    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError, UserError) as err:
        if isinstance(err, ValidationError):
            from llmcompress.pipeline.recipe import explain

            msg = explain(err)
        else:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages are kept; rerun the same command to resume")
        raise typer.Exit(130)


@contextmanager
def progress_bar():
    """A rich progress bar fed by the library's progress(label, done, total) callbacks."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:  # total 0: not known in advance (a time budget): an open-ended bar
                tasks[label] = bar.add_task(label, total=total or None)
            bar.update(tasks[label], completed=done, total=total or None)

        yield update


def _setup(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TQDM_DISABLE", "1")  # third-party progress bars; ours are rich
        for name in ("lm-eval", "lm_eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def _check_new_file(path: Optional[Path], overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite or choose another path")


def _write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.rename(path)


# ----------------------------------------------------------------------------- inspect
@app.command()
def inspect(model: Annotated[str, typer.Argument(help="'default', a model folder, a .gguf file or a hub id")],
            verbose: bool = typer.Option(False, "--verbose", "-v")):
    """Print the model graph: per-layer blocks, parameter counts and weight formats."""
    _setup(verbose)
    with user_errors():
        from llmcompress.models import count_params, layer_table, load
        from llmcompress.models.graph import is_homogeneous_parent_layout

        graph = load(model)
        c = graph.config
        table = Table(title=f"{model}: {count_params(graph):,} parameters", title_justify="left")
        for col in ("layer", "attention", "ffn", "params", "formats"):
            table.add_column(col, justify="right" if col in ("layer", "params") else "left")
        for row in layer_table(graph):
            table.add_row(str(row["layer"]), row["attention"], row["ffn"], f"{row['params']:,}", row["formats"])
        out_console.print(table)
        layout = "homogeneous (saves as the original architecture)" if is_homogeneous_parent_layout(graph) \
            else "heterogeneous (saves as Nemotron-NAS with trust_remote_code)"
        out_console.print(f"hidden {c.hidden_size}, vocab {c.vocab_size}, head_dim {c.head_dim}, "
                          f"tied embeddings: {c.tie_word_embeddings}; layout: {layout}")


# ----------------------------------------------------------------------------- eval
@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="'default', a model folder, a .gguf file or a hub id")],
    data: Annotated[str, typer.Option(help="held-out text: .txt/.jsonl/.parquet, hf:NAME or synthetic")] = "synthetic",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents of --data are held out")] = 200,
    field: Annotated[str, typer.Option(help="text field of .jsonl/.parquet rows")] = "text",
    seq_len: Annotated[int, typer.Option(help="perplexity window length")] = 512,
    max_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows")] = None,
    task: Annotated[Optional[list[str]], typer.Option(help="lm-eval task name or local MC .jsonl (repeatable)")] = None,
    task_limit: Annotated[Optional[int], typer.Option(help="rows per task")] = None,
    perplexity: Annotated[bool, typer.Option(help="measure held-out perplexity")] = True,
    speed: Annotated[bool, typer.Option(help="measure prefill latency, decode tokens/s, peak memory")] = True,
    prefill_len: int = 512,
    decode_tokens: int = 64,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    draft: Annotated[Optional[str], typer.Option(help="also measure speculative decoding with this draft: a model, "
                                                      "or layers:K / important:K of MODEL")] = None,
    gammas: Annotated[str, typer.Option(help="--draft: draft tokens per target call, comma-separated")] = "1,2,4",
    spec_prompts: Annotated[int, typer.Option(help="--draft: held-out prompts to decode")] = 4,
    spec_new_tokens: Annotated[int, typer.Option(help="--draft: greedy tokens generated per prompt")] = 32,
    draft_vocab: Annotated[Optional[int], typer.Option(help="--draft: restrict the draft's LM head to the N most "
                                                            "frequent token ids of --data (still lossless)")] = None,
    draft_stop: Annotated[float, typer.Option(help="--draft: stop a round's drafting once a proposal's draft "
                                                   "probability is below this (0: always gamma tokens)")] = 0.0,
    cpu_linear: Annotated[str, typer.Option(help="--draft: CPU linears while decoding: auto, onednn or "
                                                   "torch")] = "auto",
    lookup: Annotated[int, typer.Option(help="propose tokens looked up in the context (prompt lookup) where its "
                                             "last N..--lookup-min tokens occurred before, the --draft elsewhere; "
                                             "without --draft, lookup alone (0: off)")] = 0,
    lookup_min: Annotated[int, typer.Option(help="--lookup: the shortest n-gram that counts as a match (at most "
                                                 "--lookup)")] = 2,
    lookup_tokens: Annotated[int, typer.Option(help="--lookup: tokens proposed after a match")] = 6,
    tree_topk: Annotated[int, typer.Option(help="--draft feature:K: grow a tree per round, gamma levels deep, with "
                                                "this many children per expanded node, verified in one target pass "
                                                "(greedy; 0: a chain)")] = 0,
    tree_tokens: Annotated[int, typer.Option(help="--tree-topk: draft tokens the target verifies per round (the "
                                                  "best-scored subtree, with --lookup's chain)")] = 8,
    tree_stop: Annotated[float, typer.Option(help="--tree-topk: stop growing the tree once no frontier path's draft "
                                                  "probability reaches this (0: the full gamma levels)")] = 0.0,
    report: Annotated[Optional[Path], typer.Option(help="write the JSON report here")] = None,
    overwrite: bool = typer.Option(False, help="replace an existing --report file"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Perplexity on held-out text, lm-eval tasks, speed on this device, and with --draft speculative decoding."""
    _setup(verbose)
    with user_errors():
        from llmcompress.data import Corpus, DataConfig
        from llmcompress.evaluation import EvalConfig, evaluate
        from llmcompress.models import load
        from llmcompress.models.loading import cache_dir
        from llmcompress.pipeline.run import DTYPES
        from llmcompress.speculative.evaluate import SpecEvalConfig, evaluate_draft, parse_gammas
        from llmcompress.speculative.lookup import LookupConfig
        from llmcompress.speculative.tree import TreeConfig

        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        _check_new_file(report, overwrite)
        cfg = EvalConfig(perplexity=perplexity, ppl_seq_len=seq_len, ppl_max_windows=max_windows, tasks=task or [],
                         task_limit=task_limit, speed=speed, prefill_len=prefill_len, decode_tokens=decode_tokens)
        if lookup < 0:
            raise UserError(f"--lookup {lookup}: give the longest n-gram to match (e.g. 3), or 0 for no lookup")
        look = LookupConfig(max_ngram=lookup, min_ngram=min(lookup_min, lookup), tokens=lookup_tokens) if lookup \
            else None
        if tree_topk < 0:
            raise UserError(f"--tree-topk {tree_topk}: give the children per expanded node (e.g. 3), or 0 for a chain")
        if tree_topk and tree_tokens < 1:
            raise UserError(f"--tree-tokens {tree_tokens}: give the tokens verified per round, at least 1 (e.g. 8)")
        if tree_topk and not 0 <= tree_stop < 1:
            raise UserError(f"--tree-stop {tree_stop}: give a path probability in [0, 1) (e.g. 0.2), or 0 for none")
        if tree_topk and not (draft or "").startswith("feature:") and not _holds_feature_draft(draft):
            raise UserError("--tree-topk grows a feature draft's tree: give --draft feature:K or a trained feature "
                            "draft's folder, or leave out --tree-topk")
        tree = TreeConfig(topk=tree_topk, tokens=tree_tokens, stop=tree_stop) if tree_topk else None
        spec_cfg = SpecEvalConfig(gammas=parse_gammas(gammas), prompts=spec_prompts, new_tokens=spec_new_tokens,
                                  draft_vocab=draft_vocab, draft_stop=draft_stop, cpu_linear=cpu_linear, lookup=look,
                                  tree=tree)
        graph = load(model, dtype=DTYPES[dtype], device=device)
        spec = bool(draft or look)
        heldout = None
        if perplexity or spec:
            corpus = Corpus(DataConfig(source=data, field=field, heldout_rows=heldout_rows, seq_len=seq_len),
                            graph.tokenizer, teacher=graph, cache=cache_dir())
            heldout = corpus.heldout_stream() if perplexity else None
        with progress_bar() as update:
            result = evaluate(graph, graph.tokenizer, cfg, heldout, Path.cwd(), update)
            if spec:
                result["speculative"] = evaluate_draft(graph, draft, corpus, spec_cfg, update)
        result["model"] = model
        _render_eval(result)
        if report is not None:
            _write_json_atomic(report, result)
            console.print(f"report written to {report}")


def _holds_feature_draft(path: str | None) -> bool:
    from llmcompress.speculative.feature_draft import FEATURE_FILE

    return path is not None and (Path(path) / FEATURE_FILE).is_file()


def _render_eval(r: dict) -> None:
    table = Table(title="evaluation", title_justify="left", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{r['params']:,}")
    if "perplexity" in r:
        table.add_row("held-out perplexity", f"{r['perplexity']['perplexity']:.3f}")
    for name, metrics in r.get("tasks", {}).items():
        for m in ("acc", "acc_norm"):
            if m in metrics:
                table.add_row(f"{name} {m} ({metrics.get('rows')} rows)", f"{metrics[m]:.3f}")
    if "speed" in r:
        s = r["speed"]
        table.add_row(f"prefill {s['prefill_batch']}x{s['prefill_len']} (ms)", f"{s['prefill_ms']:.1f}")
        table.add_row("decode tokens/s (batch 1)", f"{s['decode_tok_s']:.1f}")
        table.add_row(f"peak memory (MiB, {s['peak_memory_kind']})", f"{s['peak_memory_mb']:.0f}")
    out_console.print(table)
    if "perplexity" in r:
        out_console.print(f"perplexity protocol: {r['perplexity']['protocol']}", highlight=False)
    if "speed" in r:
        out_console.print(f"device: {r['speed']['device']}, {r['speed']['threads']} threads", highlight=False)
    if "speculative" in r:
        _render_speculative(r["speculative"])


def _render_speculative(s: dict) -> None:
    look = s.get("lookup")
    by = (f"prompt lookup (n-grams {look['min_ngram']}-{look['max_ngram']}, {look['tokens']} tokens)" if look
          else "")
    if s["draft"] is None:
        title = f"speculative decoding: {by} alone"
    else:
        title = (f"speculative decoding: draft {s['draft']} ({s['draft_layers']} of {s['target_layers']} layers, "
                 f"head over {s['draft_vocab']:,} ids){' + ' + by if look else ''}"
                 + (f", tree of top-{s['tree']['topk']} children, {s['tree']['tokens']} verified per round (gamma: its "
                    "depth)" if s.get("tree") else "") + f", c = {s['cost_ratio_c']:.3f}")
    table = Table(title=title, title_justify="left")
    cols = ("gamma", "alpha", "tau", "accepted", "kept by position") if s["draft"] is not None else ("tokens", "tau")
    cols += ("looked up (kept / proposed)",) if look else ()
    for col in cols + ("predicted speed-up", "measured speed-up", "identical output"):
        table.add_column(col, justify="right")
    for g in s["gammas"]:
        kept = " ".join(f"{a:.2f}" for a in g["acceptance_by_position"])
        row = [str(g["gamma"])]
        row += [f"{g['alpha']:.3f}", f"{g['tau']:.2f}", f"{g['acceptance_rate']:.3f}", kept] if s["draft"] is not None \
            else [f"{g['tau']:.2f}"]
        row += [f"{g['lookup_accepted']:,} / {g['lookup_proposed']:,}"] if look else []
        pred = "-" if g["predicted_speedup"] is None else f"{g['predicted_speedup']:.2f}x"
        table.add_row(*row, pred, f"{g['measured_speedup']:.2f}x",
                      {True: "yes", False: "NO", None: "n/a"}[g["identical_output"]])
    out_console.print(table)
    out_console.print(f"protocol: {s['protocol']}; target alone {s['target_tok_s']:.1f} tokens/s", highlight=False)


# ----------------------------------------------------------------------------- draft
@app.command()
def draft(
    target: Annotated[str, typer.Option(help="the model to accelerate: 'default', a folder, a .gguf or a hub id")]
    = "default",
    init: Annotated[str, typer.Option(help="layers:K, important:K (of the target), feature:K (a draft reading the "
                                           "target's features, EAGLE-style) or a model with its tokenizer")]
    = "layers:6",
    divergence: Annotated[str, typer.Option(help="fkl, rkl, tvd, accept, jsd or jsd:BETA")] = "fkl",
    data: Annotated[str, typer.Option(help="training sequences: fixed, target, on-policy or mixture")] = "on-policy",
    mixture: Annotated[float, typer.Option(help="lambda: share of on-policy batches with --data mixture")] = 0.5,
    with_fixed_text: Annotated[bool, typer.Option(help="--init feature:K --data target: also train on the corpus "
                                                       "text itself (cheap to featurise, less overfitting)")] = False,
    unroll: Annotated[int, typer.Option(help="--init feature:K: train the proposals this deep, the draft reading "
                                             "its own predicted features beyond the first (EAGLE-3)")] = 1,
    online: Annotated[bool, typer.Option("--online/--offline", help="frozen target inside each step (logits + "
                                         "features), or precomputed top-k target log-probs")] = True,
    steps: Annotated[Optional[int], typer.Option(help="training steps (budget)")] = 200,
    tokens: Annotated[Optional[int], typer.Option(help="continuation tokens (budget; with --steps, whichever first)")]
    = None,
    seconds: Annotated[Optional[float], typer.Option(help="wall-clock training time of this run (budget; with "
                                                          "--steps/--tokens, whichever first)")] = None,
    batch_size: int = 4,
    gen_batch_size: Annotated[Optional[int], typer.Option(help="--data target, greedy: prompts per generate call "
                                                               "(larger: fewer, fuller calls)")] = None,
    lr: float = 5e-5,
    lr_schedule: Annotated[str, typer.Option(help="constant, or cosine: decay to 0 over --steps")] = "constant",
    warmup: Annotated[int, typer.Option(help="steps of linear learning-rate warm-up")] = 0,
    prompt_tokens: int = 32,
    new_tokens: Annotated[int, typer.Option(help="continuation tokens per sequence")] = 64,
    temperature: Annotated[float, typer.Option(help="temperature of p and q in the divergence")] = 1.0,
    feature_weight: Annotated[float, typer.Option(help="--online: weight of the SmoothL1 feature loss")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="steps between acceptance measurements")] = 50,
    eval_prompts: Annotated[int, typer.Option(help="held-out prompts of each acceptance measurement")] = 4,
    eval_new_tokens: Annotated[int, typer.Option(help="greedy tokens per acceptance prompt")] = 32,
    draft_vocab: Annotated[Optional[int], typer.Option(help="save the draft with an LM head over the N token ids "
                                                            "most frequent in its training continuations")] = None,
    corpus: Annotated[str, typer.Option(help="text: .txt/.jsonl/.parquet, hf:NAME or synthetic")] = "synthetic",
    field: Annotated[str, typer.Option(help="text field of .jsonl/.parquet rows")] = "text",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents give the acceptance prompts")] = 200,
    num_samples: Annotated[int, typer.Option(help="training sequences drawn from --corpus")] = 64,
    out: Annotated[Path, typer.Option(help="folder of the draft (out/model) and its training checkpoint")]
    = Path("draft"),
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Distil a speculative-decoding draft of TARGET (DistillSpec); rerun the same command to resume."""
    _setup(verbose)
    with user_errors():
        from llmcompress.data import Corpus, DataConfig
        from llmcompress.models import load
        from llmcompress.models.loading import cache_dir
        from llmcompress.pipeline.run import DTYPES
        from llmcompress.speculative.train import DistillConfig, distill

        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if data not in ("fixed", "target", "on-policy", "mixture"):
            raise UserError(f"--data {data!r} is not one of fixed, target, on-policy, mixture")
        cfg = DistillConfig(divergence=divergence, data=data, mixture=mixture, with_fixed_text=with_fixed_text,
                            unroll=unroll, online=online, steps=steps,
                            tokens=tokens, seconds=seconds, batch_size=batch_size,
                            gen_batch_size=gen_batch_size, lr=lr, lr_schedule=lr_schedule, warmup=warmup,
                            prompt_tokens=prompt_tokens,
                            new_tokens=new_tokens, temperature=temperature, feature_weight=feature_weight,
                            eval_every=eval_every, eval_prompts=eval_prompts, eval_new_tokens=eval_new_tokens,
                            draft_vocab=draft_vocab)
        if with_fixed_text and not init.startswith("feature:"):  # before the model and corpus are made
            raise UserError(f"--with-fixed-text is for feature drafts (--init feature:K), not {init!r}; for a "
                            "layer draft use --data mixture or fixed")
        if unroll > 1 and not init.startswith("feature:"):
            raise UserError(f"--unroll is for feature drafts (--init feature:K), not {init!r}; leave it at 1")
        graph = load(target, dtype=DTYPES[dtype], device=device)
        text = Corpus(DataConfig(source=corpus, field=field, heldout_rows=heldout_rows), graph.tokenizer,
                      teacher=graph, cache=cache_dir())
        with progress_bar() as update:
            report = distill(graph, init, text, cfg, out, num_samples, update)
        table = Table(title=f"draft {init} of {target}: {report['steps']} steps, {report['tokens']:,} tokens, "
                            f"{divergence}, {data}, {'online' if online else 'offline'}", title_justify="left")
        for col in ("step", "tokens", "alpha", f"tau (gamma {cfg.eval_gamma})"):
            table.add_column(col, justify="right")
        for e in report["acceptance"]:
            table.add_row(str(e["step"]), f"{e['tokens']:,}", f"{e['alpha']:.3f}", f"{e['tau']:.2f}")
        out_console.print(table)
        vocab = f" (LM head over {report['draft_vocab']:,} frequent ids)" if report.get("draft_vocab") else ""
        console.print(f"draft written to {report['draft']}{vocab}")


# ----------------------------------------------------------------------------- run
@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override KEY=VALUE, e.g. stages.prune.num_layers=4")] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="rerun from this stage on, even if unchanged")] = None,
    output: Annotated[Optional[str], typer.Option(help="run folder (overrides the recipe's output)")] = None,
    overwrite: bool = typer.Option(False, help="replace an existing output folder that is not a run of this tool"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Run a recipe's stages in order; finished stages with unchanged inputs are skipped."""
    _setup(verbose)
    with user_errors():
        from llmcompress.pipeline import load_recipe, run_recipe

        overrides = list(set_ or []) + ([f"output={output}"] if output else [])
        rec, base_dir = load_recipe(recipe, overrides)

        def on_stage(sr):
            state = "[dim]skipped (unchanged)[/]" if sr.skipped else f"done in {sr.seconds:.1f}s"
            console.print(f"[bold]{sr.label}[/] ({sr.type}): {state} -> {sr.folder}")

        with progress_bar() as update:
            result = run_recipe(rec, base_dir, from_stage=from_, overwrite=overwrite, progress=update,
                                on_stage=on_stage)
        if result.summary:
            md = (result.output / "summary.md").read_text()
            out_console.print(md, highlight=False, markup=False)
        console.print(f"run folder: {result.output}")


# ----------------------------------------------------------------------------- profile
def _parse_list(option: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} {text!r} is not a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise UserError(f"{option} is empty; give a comma-separated list such as 1,8")
    return values


@app.command("profile")
def profile_cmd(
    model: Annotated[str, typer.Option(help="'default', a model folder, a .gguf file or a hub id")] = "default",
    device: Annotated[str, typer.Option(help="cpu, cuda or cuda:N")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    batch: Annotated[str, typer.Option(help="batch sizes, comma-separated, e.g. 1,8,64")] = "1",
    prompt_len: Annotated[int, typer.Option(help="prompt tokens per sequence (prefill)")] = 512,
    gen_len: Annotated[int, typer.Option(help="generated tokens; decode is timed at prompt + gen/2 cached")] = 128,
    ffn_fractions: Annotated[str, typer.Option(help="FFN sizes as fractions of the parent's")] = "1,.875,.75,.5,.25,.1",
    formats: Annotated[str, typer.Option(help="weight formats of the linear layers, comma-separated")] = "dense",
    repeats: Annotated[int, typer.Option(help="timed repetitions per measurement (median, min, max kept)")] = 10,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's)")] = None,
    clock: Annotated[str, typer.Option(help="wall, or process: CPU time, which with --threads 1 ignores other "
                                            "programs on a shared CPU")] = "wall",
    out: Annotated[Path, typer.Option(help="write the cost table (JSON) here")] = Path("costs.json"),
    overwrite: bool = typer.Option(False, help="replace an existing --out file"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Time every block variant (attention, FFN sizes, linear, no-op) per weight format on a device: the cost table."""
    _setup(verbose)
    with user_errors():
        import torch

        from llmcompress.formats import WEIGHT_FORMATS
        from llmcompress.hardware import CostModel, profile, save_table
        from llmcompress.models import load
        from llmcompress.pipeline.run import DTYPES

        if device != "cpu" and not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
            raise UserError(f"--device {device!r} is not cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {device} asked, but CUDA is not available here; use --device cpu")
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if clock not in ("wall", "process") or (clock == "process" and device != "cpu"):
            raise UserError(f"--clock {clock!r}: use wall, or process with --device cpu")
        batches = _parse_list("--batch", batch, int)
        fractions = _parse_list("--ffn-fractions", ffn_fractions, float)
        fmts = _parse_list("--formats", formats, str)
        if min(batches) < 1:
            raise UserError(f"--batch {batch!r}: batch sizes must be positive")
        if not all(0 < f <= 1 for f in fractions):
            raise UserError(f"--ffn-fractions {ffn_fractions!r}: fractions must lie in (0, 1]")
        if any(f not in WEIGHT_FORMATS for f in fmts):
            raise UserError(f"--formats {formats!r}: choose from {', '.join(WEIGHT_FORMATS)}")
        if prompt_len < 1 or gen_len < 1 or repeats < 1 or (threads is not None and threads < 1):
            raise UserError("--prompt-len, --gen-len, --repeats and --threads must be at least 1")
        _check_new_file(out, overwrite)
        if device == "cpu" and fmts != ["dense"]:
            logging.getLogger(__name__).warning("on CPU the compressed formats run a torch reference path: "
                                                "their timings do not show kernel speed")
        if threads is not None:
            torch.set_num_threads(threads)
        graph = load(model, dtype=DTYPES[dtype], device=device)
        with progress_bar() as update:
            table = profile(graph, batches, prompt_len, gen_len, fractions, fmts, repeats, clock=clock,
                            model_name=model, progress=update)
        save_table(table, out, overwrite=overwrite)
        _render_profile(table, CostModel(table), graph)
        console.print(f"cost table written to {out}")


def _render_profile(table, cost_model, graph) -> None:
    s = table.settings
    t = Table(title=f"{table.device}, {table.dtype}, {s.threads} threads, {s.clock} clock: median ms of {s.repeats}; "
                    f"prefill {s.prompt_len} tokens, decode at {s.decode_context} cached", title_justify="left")
    t.add_column("block part", no_wrap=True)
    t.add_column("format")
    t.add_column("params", justify="right")
    for b in s.batches:
        t.add_column(f"prefill b={b}", justify="right")
        t.add_column(f"decode b={b}", justify="right")
    t.add_column("spread", justify="right")
    for e in table.entries.values():
        timings = [x for b in s.batches for x in (e.prefill[b], e.decode[b])]
        spread = max((x.max_ms - x.min_ms) / x.median_ms for x in timings if x.median_ms > 0)
        t.add_row(f"{e.part} {e.variant}", e.format, f"{e.params:,}", *[f"{x.median_ms:.3g}" for x in timings],
                  f"{100 * spread:.0f}%")
    out_console.print(t)
    out_console.print("spread: the largest (max - min) / median of the row", highlight=False)
    for key, why in table.skipped.items():
        console.print(f"[yellow]skipped[/] {key}: {why}", highlight=False)
    for b in s.batches:
        try:
            p = cost_model.predict(graph, batch=b)
        except ValueError as err:
            console.print(f"[yellow]no prediction for the model[/]: {err}", highlight=False)
            break
        out_console.print(f"predicted for the model at batch {b}: prefill {p['prefill_ms']:.1f} ms, decode "
                          f"{p['decode_ms_per_token']:.2f} ms/token, weights {p['param_bytes'] / 2**20:.1f} MiB, "
                          f"KV cache {p['kv_bytes'] / 2**20:.1f} MiB", highlight=False)


# ----------------------------------------------------------------------------- prune / quantize (one-shot)
def _oneshot(model: str, out: Path, overwrite: bool, dtype: str, device: str, data: str, field: str,
             heldout_rows: int, cfg, needs_data: bool, check, apply) -> None:
    """Load, check(graph, cfg), calibrate on --data, apply(graph, tokens, cfg, progress), save to out."""
    from llmcompress.data import Corpus, DataConfig
    from llmcompress.models import load, save
    from llmcompress.models.loading import cache_dir
    from llmcompress.pipeline.run import DTYPES

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_new_file(out, overwrite)
    graph = load(model, dtype=DTYPES[dtype], device=device)
    check(graph, cfg)
    tokens = None
    if needs_data:
        corpus = Corpus(DataConfig(source=data, field=field, heldout_rows=heldout_rows, seq_len=cfg.seq_len),
                        graph.tokenizer, teacher=graph, cache=cache_dir())
        tokens = corpus.train_batches(cfg.num_samples, cfg.seq_len)
    with progress_bar() as update:
        report = apply(graph, tokens, cfg, update)
    save(graph, out, overwrite=overwrite)
    out_console.print(", ".join(f"{k}: {v}" for k, v in report.items()), highlight=False)
    console.print(f"compressed-tensors checkpoint written to {out}")


@app.command()
def prune(
    model: Annotated[str, typer.Argument(help="'default', a model folder, a .gguf file or a hub id")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")],
    method: Annotated[str, typer.Option(help="sparsegpt, wanda, magnitude, or ziplm (structured, to speed-up "
                                             "targets)")] = "sparsegpt",
    pattern: Annotated[str, typer.Option(help="n:m (keep n of every m: 2:4, 4:8) or a pruned ratio (0.5)")] = "2:4",
    speedups: Annotated[str, typer.Option(help="ziplm: target speed-ups, e.g. 1.25,1.5,2.0")] = "1.25,1.5,2.0",
    metric: Annotated[str, typer.Option(help="ziplm: the latency the speed-ups refer to, decode or prefill")]
    = "decode",
    cost_table: Annotated[Optional[Path], typer.Option(help="ziplm: cost table of the target device (llmcompress "
                                                            "profile); default: profile the model here first")] = None,
    refine: Annotated[int, typer.Option(help="ziplm: rounds of measuring each model and correcting its budget")] = 1,
    search_steps: Annotated[int, typer.Option(help="ziplm: sensitivity-search steps per target (weights on the "
                                                   "DP's errors tuned on the model's KL to the dense one; 0: off)")]
    = 0,
    error_scale: Annotated[str, typer.Option(help="ziplm: none, or removal_kl (each part's errors scaled to the "
                                                  "dense model's KL without that part: lets the search remove "
                                                  "whole attention blocks where they matter little)")] = "none",
    gradual: Annotated[bool, typer.Option(help="ziplm: reach the targets in sequence, distilling from the dense "
                                               "model after each (hidden-state MSE + logit KL)")] = False,
    gradual_tokens: Annotated[int, typer.Option(help="ziplm --gradual: distillation tokens after each target")]
    = 65536,
    data: Annotated[str, typer.Option(help="calibration text: .txt/.jsonl/.parquet, hf:NAME or synthetic")] = "synthetic",
    field: Annotated[str, typer.Option(help="text field of .jsonl/.parquet rows")] = "text",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents of --data are never used")] = 200,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    batch_size: Annotated[int, typer.Option(help="sequences per layer forward")] = 8,
    blocksize: Annotated[int, typer.Option(help="SparseGPT columns per block")] = 128,
    percdamp: Annotated[float, typer.Option(help="Hessian damping (fraction of its mean diagonal)")] = 0.01,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """One-shot pruning (SparseGPT, Wanda or magnitude), calibrated layer by layer; 2:4 saves as sparse-24-bitmask.
    With --method ziplm: structured pruning to every --speedups target, one checkpoint per target under --out."""
    _setup(verbose)
    with user_errors():
        if method == "ziplm":
            _ziplm(model, out, overwrite, dtype, device, data, field, heldout_rows, num_samples, seq_len, batch_size,
                   percdamp, speedups, metric, cost_table, refine, gradual, gradual_tokens, search_steps,
                   error_scale)
            return
        from llmcompress.oneshot import PruneConfig, check_prunable, prune_model

        cfg = PruneConfig(method=method, pattern=pattern, num_samples=num_samples, seq_len=seq_len,
                          batch_size=batch_size, blocksize=blocksize, percdamp=percdamp)
        _oneshot(model, out, overwrite, dtype, device, data, field, heldout_rows, cfg, method != "magnitude",
                 check_prunable, prune_model)


def _ziplm(model, out, overwrite, dtype, device, data, field, heldout_rows, num_samples, seq_len, batch_size,
           percdamp, speedups, metric, cost_table, refine, gradual=False, gradual_tokens=65536,
           search_steps=0, error_scale="none") -> None:
    from llmcompress.data import Corpus, DataConfig
    from llmcompress.hardware.profile import load_table, save_table
    from llmcompress.models import load
    from llmcompress.models.loading import cache_dir
    from llmcompress.pipeline.run import DTYPES
    from llmcompress.prune.ziplm_family import ZipLMConfig, profile_for, run_ziplm

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        targets = [float(x) for x in speedups.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--speedups {speedups!r} must be comma-separated numbers, e.g. 1.25,1.5,2.0") from None
    if error_scale not in ("none", "removal_kl"):
        raise UserError(f"--error-scale {error_scale!r}: choose none or removal_kl")
    cfg = ZipLMConfig(speedups=targets, metric=metric, num_samples=num_samples, seq_len=seq_len,
                      batch_size=batch_size, percdamp=percdamp, refine=refine, gradual=gradual,
                      gradual_tokens=gradual_tokens, search_steps=search_steps, error_scale=error_scale)
    if out.exists() and any(out.iterdir()) and not overwrite and not (out / "database").exists():
        raise FileExistsError(f"{out} exists and is not a ZipLM output; pass --overwrite or choose another folder")
    table = load_table(cost_table) if cost_table is not None else None
    graph = load(model, dtype=DTYPES[dtype], device=device)
    text = Corpus(DataConfig(source=data, field=field, heldout_rows=heldout_rows), graph.tokenizer, teacher=graph,
                  cache=cache_dir())
    tokens = text.train_batches(cfg.num_samples, cfg.seq_len)
    out.mkdir(parents=True, exist_ok=True)
    with progress_bar() as update:
        if table is None:
            if (out / "cost_table.json").exists():
                table = load_table(out / "cost_table.json")
            else:
                table = profile_for(graph, cfg, progress=update)
                save_table(table, out / "cost_table.json", overwrite=True)
        _, report = run_ziplm(graph, tokens, cfg, table, out, progress=update)
    _write_json_atomic(out / "report.json", report)
    mode = f"gradual, {gradual_tokens:,} distillation tokens per target" if gradual else "one-shot"
    t = Table(title=f"ZipLM on {report['device']} ({metric}, batch {cfg.batch}; {mode})", title_justify="left")
    searched = any(m.get("search") for m in report["models"])
    for col in ("target", "predicted", "measured", "params") + (("search KL",) if searched else ()) + (
            "checkpoint",):
        t.add_column(col, justify="right")
    for m in report["models"]:
        meas = f"{m['measured_speedup']:.2f}x" if m["measured_speedup"] else "-"
        kl = (f"{m['search']['start_loss']:.3f} -> {m['search']['loss']:.3f}" if m.get("search") else "-",) \
            if searched else ()
        t.add_row(f"{m['target_speedup']:g}x", f"{m['predicted_speedup']:.2f}x", meas, f"{m['params']:,}", *kl,
                  m["checkpoint"])
    out_console.print(t)


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="'default', a model folder (a 2:4 one gives 2:4+int4), .gguf or hub id")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write")],
    scheme: Annotated[str, typer.Option(help="w4a16 (int4 groups), w8a16 or w8a8 (int8 per channel)")] = "w4a16",
    method: Annotated[str, typer.Option(help="gptq or rtn")] = "gptq",
    group_size: Annotated[int, typer.Option(help="int4 columns per scale: 32, 64 or 128")] = 128,
    symmetric: Annotated[bool, typer.Option("--symmetric/--asymmetric", help="int4 zero point")] = True,
    act_order: Annotated[bool, typer.Option(help="GPTQ: columns by decreasing Hessian diagonal")] = False,
    smoothquant_alpha: Annotated[Optional[float], typer.Option(help="w8a8: SmoothQuant strength, e.g. 0.5")] = None,
    data: Annotated[str, typer.Option(help="calibration text: .txt/.jsonl/.parquet, hf:NAME or synthetic")] = "synthetic",
    field: Annotated[str, typer.Option(help="text field of .jsonl/.parquet rows")] = "text",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents of --data are never used")] = 200,
    num_samples: Annotated[int, typer.Option(help="calibration sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per calibration sequence")] = 512,
    batch_size: Annotated[int, typer.Option(help="sequences per layer forward")] = 8,
    blocksize: Annotated[int, typer.Option(help="GPTQ columns per block")] = 128,
    percdamp: Annotated[float, typer.Option(help="Hessian damping (fraction of its mean diagonal)")] = 0.01,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """One-shot weight quantization (GPTQ or RTN; W8A8 with optional SmoothQuant), saved as compressed-tensors."""
    _setup(verbose)
    with user_errors():
        from llmcompress.oneshot import QuantizeConfig, check_quantizable, quantize_model

        cfg = QuantizeConfig(scheme=scheme, method=method, group_size=group_size, symmetric=symmetric,
                             act_order=act_order, smoothquant_alpha=smoothquant_alpha, num_samples=num_samples,
                             seq_len=seq_len, batch_size=batch_size, blocksize=blocksize, percdamp=percdamp)
        _oneshot(model, out, overwrite, dtype, device, data, field, heldout_rows, cfg,
                 method == "gptq" or smoothquant_alpha is not None, check_quantizable, quantize_model)


# ----------------------------------------------------------------------------- distill --recover
@app.command()
def distill(
    recover: Annotated[Optional[str], typer.Option(help="the compressed model to recover (written by prune / "
                                                        "quantize); masks and weight formats are kept")] = None,
    out: Annotated[Optional[Path], typer.Option(help="checkpoint folder to write")] = None,
    teacher: Annotated[str, typer.Option(help="the dense model it was compressed from")] = "default",
    quantizer: Annotated[str, typer.Option(help="int4 layers: ste (learnable scales) or differentiable "
                                                "(learnable levels, re-fitted to the int4 grid)")] = "ste",
    local_steps: Annotated[Optional[int], typer.Option(help="steps per decoder layer (0: no local phase)")] = 50,
    local_tokens: Annotated[Optional[int], typer.Option(help="tokens per decoder layer (budget)")] = None,
    global_steps: Annotated[Optional[int], typer.Option(help="end-to-end steps (0: no global phase)")] = 100,
    global_tokens: Annotated[Optional[int], typer.Option(help="end-to-end tokens (budget)")] = None,
    local_lr: float = 1e-3,
    lr: Annotated[float, typer.Option(help="global phase learning rate")] = 1e-5,
    local_inputs: Annotated[str, typer.Option(help="layer inputs: teacher or student (propagated)")] = "student",
    temperature: Annotated[float, typer.Option(help="logit KL temperature")] = 1.0,
    kl_weight: float = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="weight of the per-layer hidden-state loss")] = 0.1,
    hidden_loss: Annotated[str, typer.Option(help="mse (relative) or cosine")] = "mse",
    batch_size: Annotated[int, typer.Option(help="sequences per step")] = 4,
    data: Annotated[str, typer.Option(help="training text: .txt/.jsonl/.parquet, hf:NAME or synthetic")] = "synthetic",
    field: Annotated[str, typer.Option(help="text field of .jsonl/.parquet rows")] = "text",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents of --data are never used")] = 200,
    num_samples: Annotated[int, typer.Option(help="training sequences")] = 128,
    seq_len: Annotated[int, typer.Option(help="tokens per training sequence")] = 512,
    checkpoint: Annotated[Optional[Path], typer.Option(help="training checkpoint folder (default: OUT-checkpoint); "
                                                            "rerun the same command to resume")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    overwrite: bool = typer.Option(False, help="replace an existing --out folder"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Distillation from the dense teacher: --recover a pruned / quantized model (local per layer, then global)."""
    _setup(verbose)
    with user_errors():
        from llmcompress.data import Corpus, DataConfig
        from llmcompress.models import load, save
        from llmcompress.models.loading import cache_dir
        from llmcompress.pipeline.run import DTYPES
        from llmcompress.recover import RecoverConfig, check_recoverable, recover as recover_model

        if recover is None:
            raise UserError("give the compressed model to recover: --recover FOLDER (the output of prune or quantize)")
        if out is None:
            raise UserError("give the folder to write the recovered checkpoint to: --out FOLDER")
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        _check_new_file(out, overwrite)
        cfg = RecoverConfig(quantizer=quantizer, local_steps=local_steps, local_tokens=local_tokens,
                            global_steps=global_steps, global_tokens=global_tokens, local_lr=local_lr, lr=lr,
                            local_inputs=local_inputs, temperature=temperature, kl_weight=kl_weight,
                            hidden_weight=hidden_weight, hidden_loss=hidden_loss, batch_size=batch_size,
                            num_samples=num_samples, seq_len=seq_len)
        student = load(recover, dtype=DTYPES[dtype], device=device)
        dense = load(teacher, dtype=DTYPES[dtype], device=device)
        check_recoverable(student, dense, cfg)
        corpus = Corpus(DataConfig(source=data, field=field, heldout_rows=heldout_rows, seq_len=seq_len),
                        student.tokenizer, teacher=dense, cache=cache_dir())
        tokens = corpus.train_batches(num_samples, seq_len)
        checkpoint = checkpoint or out.with_name(out.name + "-checkpoint")
        with progress_bar() as update:
            report = recover_model(student, dense, tokens, cfg, checkpoint, update)
        save(student, out, overwrite=overwrite)
        out_console.print(f"KL to the teacher (first training batch): {report['kl_before']:.4f} -> "
                          f"{report['kl_after']:.4f}; {report['tokens']:,} tokens trained", highlight=False)
        console.print(f"recovered checkpoint written to {out} (training checkpoint: {checkpoint})")


# ----------------------------------------------------------------------------- search (Puzzle)
@app.command()
def search(
    method: Annotated[str, typer.Option(help="search method: puzzle")] = "puzzle",
    model: Annotated[str, typer.Option(help="'default', a model folder, a .gguf file or a hub id")] = "default",
    target_speedup: Annotated[float, typer.Option(help="predicted latency speed-up over MODEL to reach")] = 1.5,
    metric: Annotated[str, typer.Option(help="the latency the speed-up is on: decode (batch 1) or prefill")]
    = "decode",
    data: Annotated[str, typer.Option(help="training text: .txt/.jsonl/.parquet, hf:NAME or synthetic")]
    = "synthetic",
    heldout_rows: Annotated[int, typer.Option(help="the last N documents of --data are held out")] = 200,
    seq_len: Annotated[int, typer.Option(help="tokens per training window")] = 256,
    cost_table: Annotated[Optional[Path], typer.Option(help="cost table from `llmcompress profile` (default: "
                                                           "profile the blocks on --device)")] = None,
    prompt_len: Annotated[int, typer.Option(help="deployment prompt length (profiling and prefill)")] = 512,
    gen_len: Annotated[int, typer.Option(help="deployment generation length (profiling)")] = 128,
    bld_tokens: Annotated[int, typer.Option(help="blockwise distillation tokens per block")] = 8192,
    gkd_tokens: Annotated[int, typer.Option(help="global distillation tokens")] = 65536,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="measure perplexity and speed of the result")]
    = True,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override KEY=VALUE of the generated recipe, "
                                                      "e.g. stages.puzzle_bld.num_samples=32")] = None,
    out: Annotated[Path, typer.Option(help="run folder; rerun the same command to resume")]
    = Path("runs/search-puzzle"),
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    device: str = "cpu",
    overwrite: bool = typer.Option(False, help="replace an existing --out folder that is not a run of this tool"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
):
    """Search a faster model under a latency budget (Puzzle: library, BLD, scoring, MIP, GKD); resumable."""
    _setup(verbose)
    with user_errors():
        from llmcompress.pipeline import apply_overrides, run_recipe
        from llmcompress.pipeline.recipe import Recipe
        from llmcompress.stages.puzzle import search_recipe

        if method != "puzzle":
            raise UserError(f"--method {method!r} is not available; choose puzzle")
        if metric not in ("decode", "prefill"):
            raise UserError(f"--metric {metric!r} is not decode or prefill")
        raw = search_recipe(model, data, str(out), target_speedup, device, dtype, metric,
                            str(cost_table) if cost_table else None, bld_tokens, gkd_tokens, seq_len, heldout_rows,
                            prompt_len, gen_len, evaluate)
        rec = Recipe.model_validate(apply_overrides(raw, list(set_ or [])))

        def on_stage(sr):
            state = "[dim]skipped (unchanged)[/]" if sr.skipped else f"done in {sr.seconds:.1f}s"
            console.print(f"[bold]{sr.label}[/]: {state}")

        with progress_bar() as update:
            result = run_recipe(rec, Path.cwd(), overwrite=overwrite, progress=update, on_stage=on_stage)
        _render_search(next(s.report for s in result.stages if s.type == "puzzle_mip"))
        if result.summary:
            out_console.print((result.output / "summary.md").read_text(), highlight=False, markup=False)
        console.print(f"model written to {next(s.folder for s in result.stages if s.type == 'gkd') / 'model'}")


def _render_search(r: dict) -> None:
    best = r["solutions"][0]
    table = Table(title=f"Puzzle solution: {'; '.join(r['budgets'])}", title_justify="left")
    for col in ("layer", "attention", "ffn"):
        table.add_column(col, justify="right" if col == "layer" else "left")
    for i, name in enumerate(best["blocks"]):
        table.add_row(str(i), *name.split("+"))
    out_console.print(table)
    speed = best["predicted_speedup"]
    line = (f"predicted speed-up: decode {speed['decode']:.2f}x, prefill {speed['prefill']:.2f}x; "
            f"params {best['predicted']['params']:,}; score (sum of block KL) {best['score']:.4g}")
    for name in ("greedy", "uniform"):
        base = r.get(name)
        line += f"; {name} " + (f"{base['score']:.4g}" if base and "score" in base else "infeasible")
    out_console.print(line, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
