#!/usr/bin/env bash
# Builds .gpsp/ (ignored through .git/info/exclude) for benchmarks/prosparse_gpu.py on a lent GPU:
# the 98 MB GGUF is over the 64 MiB one device call carries, so it travels in two halves.
#   call 1: carry .gpsp/a   command: mkdir -p /tmp/gpsp && cp .gpsp/a/* /tmp/gpsp/
#   call 2 (while the machine is warm): carry .gpsp/b   command:
#     cat /tmp/gpsp/part1 .gpsp/b/part2 > /tmp/SmolLM2-135M-Instruct.Q4_1.gguf &&
#     PYTHONPATH=$PWD/src:$PWD/.gpsp/b/site python3 benchmarks/prosparse_gpu.py \
#       --model /tmp/SmolLM2-135M-Instruct.Q4_1.gguf \
#       --data /tmp/gpsp/wikipedia_en.jsonl.gz,/tmp/gpsp/openstax_textbooks.jsonl.gz \
#       --eval .gpsp/b/wiki.test.raw --out $OUT --seconds 180 --deadline 540 --lr 3e-4 --peak-lambda 0.2
# (A carried path that a later call does not name is not kept there, hence the copy to /tmp.)
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import gguf, pathlib; print(pathlib.Path(gguf.__file__).parents[1])')
gguf_file=$(.venv/bin/python -c 'from actsparse.loading import default_model_path; print(default_model_path())')
data=../shared/data
grep -qx '/.gpsp/' .git/info/exclude 2>/dev/null || echo '/.gpsp/' >> .git/info/exclude
rm -rf .gpsp && mkdir -p .gpsp/a .gpsp/b/site
head -c 39000000 "$gguf_file" > .gpsp/a/part1
tail -c +39000001 "$gguf_file" > .gpsp/b/part2
cp "$data/train/wikipedia_en.jsonl.gz" "$data/train/openstax_textbooks.jsonl.gz" .gpsp/a/
cp "$data/wikitext2/wiki.test.raw" .gpsp/b/
cp -r "$site/gguf" "$site"/gguf-*.dist-info .gpsp/b/site/  # transformers reads gguf's version from its metadata
find .gpsp -name __pycache__ -prune -exec rm -rf {} +
du -sb .gpsp/a .gpsp/b
