#!/usr/bin/env bash
# The accuracy matrix of issues 3 and 4 on the embedded SmolLM2-135M, CPU.
#   all/            one `actsparse compare`: dense, teal, rsparse, larosa, wina, cats at 25/40/50/65%
#   teal-greedy/    TEAL's greedy per-block allocation against uniform at 50%
#   paper-rows.txt  R-Sparse and LaRoSA as their papers set them, at 40/50% (accuracy_rsparse_larosa.py)
# Calibration: C4 train sample (16 x 512); perplexity: WikiText-2 test, first 40 windows of 512 tokens.
# Two single-threaded jobs in parallel use both cores best. Results land in $OUT (default
# benchmarks/results/accuracy/accuracy_cpu_DATE); each job prints a table and a JSON line.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
OUT=${OUT:-benchmarks/results/accuracy/accuracy_cpu_$(date +%F)}
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
COMMON=(--calib "$SHARED/c4/c4_train_sample.jsonl" --ppl "$SHARED/wikitext2/wiki.test.raw" --windows 40 --seq-len 512)
.venv/bin/actsparse compare --methods teal,rsparse,larosa,wina,cats --sparsity 0.25,0.4,0.5,0.65 "${COMMON[@]}" \
  --out "$OUT/all" > "$OUT/all.log" 2>&1 &
( .venv/bin/actsparse compare --methods teal --allocation greedy --sparsity 0.5 "${COMMON[@]}" --out "$OUT/teal-greedy" \
  > "$OUT/teal-greedy.log" 2>&1 &&
  .venv/bin/python benchmarks/accuracy_rsparse_larosa.py --rows rsparse-paper,larosa-paper --sparsity 0.4,0.5 \
  > "$OUT/paper-rows.txt" 2> "$OUT/paper-rows.log" ) &
wait
