"""Feature-draft benchmark: an EAGLE-style draft of the default model (`llmcompress.speculative.feature_draft`),
measured by greedy speculative decoding on this CPU under the protocol of benchmarks/draft.py.

Held-out prompts: chat instructions "Summarise: <document>" from the last 200 rows of calib_wikihow.jsonl (each
exactly --prompt-tokens tokens), greedy, --new-tokens new tokens, batch 1, --threads torch threads. Training data:
the target's greedy continuations (--train-new-tokens) of the same instruction over the first 800 rows, with the
target's features over them cached once (offline mode; made --chunk prompts at a time into the work folder, a
rerun reuses them). The draft's LM head covers the --draft-vocab ids most frequent in those continuations (plus
special tokens). Rows: the undistilled draft (balanced fc, copied last layer) and the trained one.
Writes benchmarks/results/<name>.{json,md}.

    python benchmarks/draft_feature.py [--train-prompts 480] [--steps 600] [--threads 1]

Training on a lent GPU, measuring here: `--train-device cuda --export DIR` makes the data and trains there (budget
--steps and/or --train-seconds) and writes the draft's trained tensors in float16 (feature_draft.safetensors,
about 8 MB for one layer), its proposal ids and the training report to DIR without measuring anything; `--trained
DIR` then measures that draft here (benchmarks/draft_gpu.sh with FEATURE=1 runs the GPU half).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, machine, write_results  # noqa: E402
from draft import data_rows, fixed_windows, measurer, prompt_sets, results_table  # noqa: E402

import torch  # noqa: E402


def train_copy(args, target, start, seqs, feats, acceptance, work: Path, data_s: float, device: str):
    """Train a copy of `start` (or of the --init-draft draft) offline on the cached target sequences.
    -> (draft, training report)"""
    from llmcompress.speculative.feature_draft import FeatureDistillConfig, FeatureDraft, train_feature_draft

    steps = None if args.train_seconds and not args.steps else args.steps
    every = args.eval_every or max((steps or 400) // 4, 1)
    cfg = FeatureDistillConfig(divergence=args.divergence, feature_weight=args.feature_weight,
                               logit_weight=args.logit_weight, noise=args.noise, batch_size=args.batch_size,
                               lr=args.lr, steps=steps, seconds=args.train_seconds, eval_every=every,
                               checkpoint_every=every, unroll=args.unroll, lr_schedule=args.lr_schedule,
                               warmup=args.warmup)
    draft = copy.deepcopy(start)
    if args.init_draft:  # go on training a saved draft: its trained tensors replace the start's
        saved = FeatureDraft.load(target, args.init_draft)
        ids = [getattr(d.lm_head, "keep", torch.empty(0)) for d in (saved, start)]
        if saved.init_layers != start.init_layers or not torch.equal(*ids):
            raise SystemExit(f"--init-draft {args.init_draft}: its layers or proposal ids differ from this run's "
                             "(give the same --layers, --draft-vocab and training data)")
        with torch.no_grad():
            for k, p in draft.trainable().items():
                p.copy_(saved.trainable()[k])
    t0 = time.perf_counter()
    rep = train_feature_draft(target, draft, seqs, cfg, work / f"train-{args.name}", evaluate=acceptance,
                              features=feats)
    dev_name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else "cpu"
    return draft, rep | {"seconds_this_run": time.perf_counter() - t0, "data_seconds": data_s,
                         "train_sequences": len(seqs), "device": dev_name, "init_draft": args.init_draft}


def later_pieces(args, tok, train: torch.Tensor, piece: int, n: int) -> torch.Tensor:
    """Prompts framed, like the training prompts, from the first 800 rows, but from each document's `piece`-th
    consecutive piece (2: the pieces --prompts-per-doc 2 adds and the training prompts lack; 3: those that
    --prompts-per-doc 3 adds to 2), n of them (-1: all). -> [N, P]"""
    from llmcompress.speculative.evaluate import instruction_prompts

    rows = data_rows()[:800]
    upto = instruction_prompts(tok, rows, 10 ** 9, args.prompt_tokens, per_doc=piece)  # [M, P]
    have = {tuple(r.tolist()) for r in train}
    if piece > 2:
        have |= {tuple(r.tolist()) for r in instruction_prompts(tok, rows, 10 ** 9, args.prompt_tokens,
                                                                per_doc=piece - 1)}
    rest = torch.stack([r for r in upto if tuple(r.tolist()) not in have])
    return rest if n < 0 else rest[:n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the draft (copies of the target's last)")
    ap.add_argument("--train-prompts", type=int, default=480)
    ap.add_argument("--train-new-tokens", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32, help="prompts per generate call when making the training data")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-schedule", default="constant", choices=["constant", "cosine"],
                    help="cosine: decay the learning rate to 0 over --steps")
    ap.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up")
    ap.add_argument("--divergence", default="fkl")
    ap.add_argument("--feature-weight", type=float, default=0.1)
    ap.add_argument("--logit-weight", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--unroll", type=int, default=1,
                    help="train the proposals this deep, the draft reading its own predicted features beyond the "
                         "first (EAGLE-3's training-time test)")
    ap.add_argument("--init-draft", default=None,
                    help="go on training the feature draft saved in this folder (e.g. work/draft-NAME of an earlier "
                         "run) instead of the undistilled start")
    ap.add_argument("--draft-vocab", type=int, default=8192)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--eval-prompts", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=None, help="steps between acceptance logs (default steps/4)")
    ap.add_argument("--gammas", default="2,3,4,5")
    ap.add_argument("--draft-stop", type=float, default=0.0,
                    help="stop a round's drafting once a proposal's draft probability is below this")
    ap.add_argument("--lookup", type=int, default=0,
                    help="also measure the trained draft with prompt lookup: rounds whose last N..--lookup-min tokens "
                         "occurred before propose what followed (0: off)")
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-tokens", type=int, default=6)
    ap.add_argument("--lookup-alone", default="",
                    help="MAX:MIN:TOKENS: also measure prompt lookup with no draft model, and transformers' "
                         "generate(prompt_lookup_num_tokens=TOKENS, max_matching_ngram_size=MAX) as its peer")
    ap.add_argument("--tree", default="",
                    help="TOPK:TOKENS[:STOP]: also measure tree verification (each round the draft grows a tree "
                         "--gammas levels deep, TOPK children per expanded node, stopping once no path's draft "
                         "probability reaches STOP, and the target verifies its TOKENS best nodes in one pass), for "
                         "the undistilled and the trained draft, and with --lookup also beside it")
    ap.add_argument("--cpu-linear", default="auto", choices=["auto", "onednn", "torch"],
                    help="how the models' linears run while measuring (auto: oneDNN, weights reordered once)")
    ap.add_argument("--train-threads", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads while measuring speed")
    ap.add_argument("--fixed-windows", type=int, default=0,
                    help="also train on this many windows of the training documents' own text (-1: all of them), "
                         "featurised once by a teacher-forced target pass (EAGLE's fixed-data recipe; cheap next to "
                         "generating continuations)")
    ap.add_argument("--second-pieces", type=int, default=0,
                    help="also train on the target's continuations of this many prompts framed from the training "
                         "documents' second pieces (-1: all), made into their own folder (the LM head's ids are "
                         "still chosen from the first continuations alone)")
    ap.add_argument("--third-pieces", type=int, default=0,
                    help="the same for the documents' third pieces (their own folder)")
    ap.add_argument("--prompts-per-doc", type=int, default=1,
                    help="training prompts framed from each training document's consecutive pieces")
    ap.add_argument("--train-seconds", type=float, default=None, help="wall-clock training budget")
    ap.add_argument("--train-device", default="cpu", help="where the draft is trained (cuda: with --export)")
    ap.add_argument("--export", default=None, help="train, write the draft here, measure nothing")
    ap.add_argument("--trained", default=None, help="measure the draft --export wrote to this folder")
    ap.add_argument("--target", default="default", help="the target model (a GGUF path on a lent machine)")
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench-draft-feature"))
    ap.add_argument("--name", default="draft-feature")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)

    from llmcompress.models import load
    from llmcompress.speculative.feature_draft import (FeatureDraft, cache_target_sequences,
                                                       feature_speculative_decode)
    from llmcompress.speculative.lookup import LookupConfig
    from llmcompress.speculative.tree import TreeConfig
    from llmcompress.speculative.vocab import frequent_tokens, restrict_vocab, special_ids, token_counts

    if args.export and args.trained:
        ap.error("--export trains a draft, --trained measures one: give one of them")
    if args.train_device != "cpu" and not args.export:
        ap.error(f"--train-device {args.train_device} needs --export: speed is measured on this CPU")
    if args.trained and not (Path(args.trained) / "export.json").is_file():
        ap.error(f"--trained {args.trained}: no export.json there; give the folder that --export wrote")
    try:
        look = LookupConfig(max_ngram=args.lookup, min_ngram=args.lookup_min, tokens=args.lookup_tokens) \
            if args.lookup else None
        fields = ("max_ngram", "min_ngram", "tokens")
        alone = LookupConfig(**dict(zip(fields, map(int, args.lookup_alone.split(":"))))) \
            if args.lookup_alone else None
    except ValueError as e:  # a pydantic error (its first message) or a part that is not an integer
        msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        ap.error(f"--lookup/--lookup-alone: {msg} (--lookup-alone takes MAX:MIN:TOKENS, e.g. 3:1:6)")
    try:
        parts = args.tree.split(":") if args.tree else []
        if parts and len(parts) not in (2, 3):
            raise ValueError(f"{len(parts)} part(s) where 2 or 3 belong")
        tree = TreeConfig(topk=int(parts[0]), tokens=int(parts[1]), stop=float(parts[2]) if len(parts) == 3 else 0) \
            if parts else None
    except ValueError as e:
        msg = e.errors()[0]["msg"] if hasattr(e, "errors") else str(e)
        ap.error(f"--tree {args.tree}: {msg} (--tree takes TOPK:TOKENS[:STOP], e.g. 3:8:0.2)")
    if args.smoke:
        args.train_prompts, args.chunk, args.train_new_tokens, args.steps = 8, 4, 16, 4
        args.eval_prompts, args.new_tokens, args.gammas = 2, 16, "2,3"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    torch.set_num_threads(args.train_threads)
    device = args.train_device if args.export else "cpu"
    target = load(args.target, device=device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # training only; the measured drafts run in fp32 on the CPU
    tok = target.tokenizer
    train, prompts, ecfg = prompt_sets(args, tok)

    n_layers = len(target.model.layers)
    layers = list(range(n_layers - args.layers, n_layers))
    if args.trained:  # the draft of a lent GPU: its proposal ids and trained tensors, its start rebuilt here
        info = json.loads((Path(args.trained) / "export.json").read_text())
        trained = FeatureDraft.load(target, args.trained)
        if trained.init_layers != layers:
            ap.error(f"--trained {args.trained} holds a draft of layers {trained.init_layers}; pass --layers "
                     f"{len(trained.init_layers)}")
        keep, seqs, feats, data_s = trained.lm_head.keep, None, None, info["training"]["data_seconds"]
        n_fixed, n_second = info["training"].get("fixed_windows", 0), info["training"].get("second_pieces", 0)
        calib = torch.tensor(info["calib"])
    else:
        t0 = time.perf_counter()
        folder = work / f"sequences-{args.prompt_tokens}+{args.train_new_tokens}-per{args.prompts_per_doc}"
        seqs, feats = cache_target_sequences(target, train, args.train_new_tokens, folder, args.chunk)
        n_fixed = 0
        counts = token_counts(seqs[:, args.prompt_tokens:], target.config.vocab_size)
        n_second = 0
        for piece, n in ((2, args.second_pieces), (3, args.third_pieces)):
            if not n:
                continue
            extra = later_pieces(args, tok, train, piece, n)
            eseqs, efeats = cache_target_sequences(target, extra, args.train_new_tokens,
                                                   work / f"sequences-{args.prompt_tokens}+{args.train_new_tokens}"
                                                   f"-piece{piece}", args.chunk)
            seqs, feats, n_second = torch.cat([seqs, eseqs]), torch.cat([feats, efeats]), n_second + len(eseqs)
        if args.fixed_windows:
            fixed = fixed_windows(args, tok, None if args.fixed_windows < 0 else args.fixed_windows)
            fseqs, ffeats = cache_target_sequences(target, fixed, 0, work / f"fixed-{fixed.shape[1]}", args.chunk)
            seqs, feats, n_fixed = torch.cat([seqs, fseqs]), torch.cat([feats, ffeats]), len(fseqs)
        data_s = time.perf_counter() - t0
        keep = frequent_tokens(counts, args.draft_vocab, special_ids(tok))
        calib = seqs[:4]
    start = FeatureDraft.from_target(target, layers, calib=calib.to(device))
    restrict_vocab(start.body, keep)

    measure = measurer(args, target, prompts, ecfg)

    def acceptance(draft) -> dict:  # alpha at gamma 3 on 4 held-out prompts, 48 tokens (as benchmarks/draft.py)
        s = o = 0.0
        for p in prompts[:4]:
            _, st = feature_speculative_decode(target, draft, p, 48, gamma=3)
            s, o = s + st.overlap_sum, o + st.overlap_count
        return {"alpha": s / max(o, 1)}

    init = f"feature:{args.layers}"
    if args.export:
        draft, training = train_copy(args, target, start, seqs, feats, acceptance, work, data_s, device)
        training["fixed_windows"], training["second_pieces"] = n_fixed, n_second
        draft.save(args.export, dtype=torch.float16)
        info = {"training": training, "calib": calib.tolist(), "settings": vars(args), "commit": git_commit(),
                "machine": machine()}
        (Path(args.export) / "export.json").write_text(json.dumps(info, indent=1, default=str))
        print(f"trained {init}: {training['steps']} steps, {training['tokens']:,} tokens, "
              f"{training['seconds']:.0f} s on {training['device']}; written to {args.export}")
        return 0
    results = [{"draft": f"{init} undistilled", "training": None, "eval": measure(start)}]
    tree_measure = measurer(args, target, prompts, ecfg.model_copy(update={"tree": tree})) if tree else None
    tree_name = (f" + tree {tree.topk}/{tree.tokens}" + (f" stop {tree.stop}" if tree.stop else "")) if tree else ""
    if tree:  # the trained tree's tau is compared with the undistilled draft's tree
        results.append({"draft": f"{init} undistilled{tree_name}", "training": None, "eval": tree_measure(start)})
    if args.trained:
        draft, training = trained, info["training"] | {"exported_as": "float16"}
    else:
        draft, training = train_copy(args, target, start, seqs, feats, acceptance, work, data_s, device)
        training["fixed_windows"], training["second_pieces"] = n_fixed, n_second
        draft.save(work / f"draft-{args.name}")
    data = "target+fixed" if n_fixed else "target"
    name = f"{init} {args.divergence}/{data}/offline"
    results.append({"draft": name, "training": training, "eval": measure(draft)})
    if tree:
        results.append({"draft": name + tree_name, "training": training, "eval": tree_measure(draft),
                        "base": results[1]["eval"]})
    lookups = []  # (row, lookup) of the rows with looked-up proposals
    if look:
        results.append({"draft": f"{name} + lookup {look.min_ngram}-{look.max_ngram}/{look.tokens}",
                        "training": training, "eval": measurer(args, target, prompts, ecfg.model_copy(
                            update={"lookup": look}))(draft)})
        lookups.append((results[-1], look))
    if look and tree:
        results.append({"draft": f"{name}{tree_name} + lookup {look.min_ngram}-{look.max_ngram}/{look.tokens}",
                        "training": training, "base": results[1]["eval"],
                        "eval": measurer(args, target, prompts, ecfg.model_copy(
                            update={"lookup": look, "tree": tree}))(draft)})
        lookups.append((results[-1], look))
    if alone:
        row = {"draft": f"prompt lookup {alone.min_ngram}-{alone.max_ngram}/{alone.tokens} alone", "training": None,
               "eval": measurer(args, target, prompts, ecfg.model_copy(
                   update={"lookup": alone, "compare_hf": True}))(None)}
        results.append(row)
        lookups.append((row, alone))

    wall = time.perf_counter() - t_all
    base = results[0]["eval"]
    report = {"benchmark": "draft_feature", "commit": git_commit(), "machine": machine(), "wall_s": wall,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "settings": vars(args),
              "results": results}
    lines = ["# Feature draft (EAGLE-style) of the default model, greedy speculative decoding, this CPU\n",
             f"commit {report['commit']}, {report['machine']['cpu']}; speed measured with {args.threads} torch "
             f"threads, training with {args.train_threads}; whole run {wall / 60:.1f} min\n",
             f"{len(prompts)} held-out prompts (\"Summarise: <document>\" chat prompts of {args.prompt_tokens} tokens "
             f"from the last 200 rows), {args.new_tokens} new tokens each, batch 1. Target alone: "
             f"{base['target_tok_s']:.1f} tok/s.\n"] + results_table(results, base, f" vocab {args.draft_vocab}")
    for row, lk in lookups:
        for g in row["eval"]["gammas"]:
            lines.append("")
            lines.append(f"{row['draft']}, gamma {g['gamma']}: {g['lookup_rounds']} of {g['target_calls']} rounds "
                         + ("with a looked-up chain in the tree, " if row["eval"].get("tree") else "looked up, ")
                         + f"{g['lookup_accepted']:,} of {g['lookup_proposed']:,} looked-up tokens kept"
                         + (f"; transformers' prompt lookup (generate(prompt_lookup_num_tokens={lk.tokens}, "
                            f"max_matching_ngram_size={lk.max_ngram})) on the same prompts: "
                            f"{g['hf_measured_speedup']:.2f}x, identical {g['hf_identical_output']}"
                            if "hf_measured_speedup" in g else ""))
    hist = ", ".join(f"{e['step']}: {e['alpha']:.2f}" for e in training["acceptance"])
    ts = info["settings"] if args.trained else vars(args)
    lines += ["", f"Acceptance during training (alpha at gamma 3 on 4 held-out prompts, 48 tokens): {hist}", "",
              f"- protocol: {base['protocol']}"] + (
                 [f"- tree rows: {results[1]['eval']['protocol'].split('; tree verification: ')[1]}"] if tree else []
             ) + [
              f"- draft: fc([f_t ; e(x_t+1)]) (balanced scaled identities at start) -> a copy of the target's last "
              f"{args.layers} layer(s) -> the target's final norm -> the target's LM head over the {args.draft_vocab} "
              "ids most frequent in the training continuations (plus special tokens); the target's true features "
              "replace the draft's own after every verification",
              f"- training (offline) on {training['device']}: {training['train_sequences'] - n_fixed} target greedy "
              f"continuations of {ts['train_new_tokens']} tokens after {ts['prompt_tokens']}-token training prompts"
              + (f" ({n_second} of them of prompts framed from the documents' "
                 f"{'second and third' if ts.get('third_pieces') else 'second'} pieces)" if n_second else "")
              + (f", plus {n_fixed} windows of {ts['prompt_tokens'] + ts['train_new_tokens']} tokens of the first 800 "
                 "rows' own text (features from one teacher-forced target pass, logits from the target's head)"
                 if n_fixed else "")
              + f", made and featurised once in {data_s / 60:.1f} min (0 when reused); {training['steps']} steps "
              f"of batch "
              f"{ts['batch_size']} x {ts['prompt_tokens'] + ts['train_new_tokens']} tokens, lr {ts['lr']}"
              + (f" ({ts['lr_schedule']}, {ts.get('warmup', 0)} warm-up steps)"
                 if ts.get("lr_schedule", "constant") != "constant" or ts.get("warmup") else "") + ", loss = "
              f"{ts['feature_weight']} x SmoothL1(features) + {ts['logit_weight']} x {ts['divergence']}(p, q) over "
              f"the draft's ids"
              + (f", proposals unrolled {ts['unroll']} deep (the draft reading its own predicted features beyond the "
                 "first, EAGLE-3's training-time test; the loss the mean over depths)" if ts.get("unroll", 1) > 1
                 else "")
              + (f"; trained on from the draft in {ts['init_draft']} (its own run's notes give its training)"
                 if ts.get("init_draft") else "")
              + f"; top-1 agreement on training batches {training['top1_first']:.2f} (first 10 steps) "
              f"-> {training['top1_last']:.2f} (last 10)"
              + (" (by depth: " + " / ".join(f"{a:.2f}" for a in training["top1_last_by_depth"]) + ")"
                 if len(training.get("top1_last_by_depth", [])) > 1 else "") + (
                  "; trained tensors brought here in float16" if args.trained else ""),
              "- reproduce: `python benchmarks/draft_feature.py " + " ".join(argv or sys.argv[1:]) + "`"]
    md = "\n".join(lines) + "\n"
    js, mdp = write_results(args.name + ("-smoke" if args.smoke else ""), report, md,
                            out=work if args.smoke else RESULTS)
    print(md)
    print(f"written {js} and {mdp}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
