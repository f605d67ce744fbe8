#!/usr/bin/env bash
# Issue 3's accuracy matrix on the embedded SmolLM2-135M: dense, teal, cats, wina at 25/40/50/65%,
# and TEAL's greedy allocation against uniform at 50%. Calibration: C4 train sample (16 x 512);
# perplexity: WikiText-2 test, first 40 windows of 512 tokens. Two single-threaded runs in
# parallel use both cores best. Each prints a table and a JSON line; results land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
COMMON=(--calib "$SHARED/c4/c4_train_sample.jsonl" --ppl "$SHARED/wikitext2/wiki.test.raw" --windows 40 --seq-len 512)
.venv/bin/actsparse compare --methods teal,wina --sparsity 0.25,0.4,0.5,0.65 "${COMMON[@]}" --out "$OUT/teal-wina" &
( .venv/bin/actsparse compare --methods cats --sparsity 0.25,0.4,0.5,0.65 "${COMMON[@]}" --out "$OUT/cats" &&
  .venv/bin/actsparse compare --methods teal --allocation greedy --sparsity 0.5 "${COMMON[@]}" --out "$OUT/teal-greedy" ) &
wait
