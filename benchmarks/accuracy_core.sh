#!/usr/bin/env bash
# Issue 3's accuracy matrix on the embedded SmolLM2-135M: dense, teal, cats, wina at 25/40/50/65%,
# then TEAL's greedy allocation against uniform at 50%. Calibration: C4 train sample (16 x 512);
# perplexity: WikiText-2 test, first 40 windows of 512 tokens. Prints tables and JSON lines.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
COMMON=(--calib "$SHARED/c4/c4_train_sample.jsonl" --ppl "$SHARED/wikitext2/wiki.test.raw" --windows 40 --seq-len 512)
.venv/bin/actsparse compare --methods teal,cats,wina --sparsity 0.25,0.4,0.5,0.65 "${COMMON[@]}" --out "$OUT/core"
.venv/bin/actsparse compare --methods teal --allocation greedy --sparsity 0.5 "${COMMON[@]}" --out "$OUT/teal-greedy"
