#!/usr/bin/env bash
# Builds .gpsp/ (ignored through .git/info/exclude) for benchmarks/prosparse_gpu.py on a lent GPU.
# The 98 MB GGUF and the three training files are over the 64 MiB one device call carries, so
# they travel in three parts, one call each, while the machine stays warm (/tmp persists there;
# a carried path that a later call does not name is not kept, hence the copies):
#   call 1: carry .gpsp/a   command: mkdir -p /tmp/gpsp && cp .gpsp/a/* /tmp/gpsp/
#   call 2: carry .gpsp/b   command: cp .gpsp/b/* /tmp/gpsp/
#   call 3: carry .gpsp/c   command: cp -r .gpsp/c/* /tmp/gpsp/ && cat /tmp/gpsp/part[123] > /tmp/model.gguf && RUN
#   later calls (nothing carried): RUN again, which resumes from the checkpoint under --work
# where RUN stands for the command
#     PYTHONPATH=$PWD/src:/tmp/gpsp/site python3 benchmarks/prosparse_gpu.py --model /tmp/model.gguf \
#       --data /tmp/gpsp/wikipedia_en.jsonl.gz,/tmp/gpsp/openstax_textbooks.jsonl.gz,/tmp/gpsp/gutenberg_books.jsonl.gz \
#       --eval /tmp/gpsp/wiki.test.raw --work /tmp/psw --out $OUT --steps N --deadline 570 ...
# Send all of a lease's calls as one batch: the machine goes back after 30 s idle, and /tmp with
# the checkpoint goes with it. Start each later call with `ls /tmp/psw || exit 3` so that one
# finding a fresh machine stops at once.
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import gguf, pathlib; print(pathlib.Path(gguf.__file__).parents[1])')
gguf_file=$(.venv/bin/python -c 'from actsparse.loading import default_model_path; print(default_model_path())')
data=../shared/data
grep -qx '/.gpsp/' .git/info/exclude 2>/dev/null || echo '/.gpsp/' >> .git/info/exclude
rm -rf .gpsp && mkdir -p .gpsp/a .gpsp/b .gpsp/c/site
dd if="$gguf_file" of=.gpsp/a/part1 bs=1M iflag=count_bytes count=39000000 status=none
dd if="$gguf_file" of=.gpsp/b/part2 bs=1M iflag=skip_bytes,count_bytes skip=39000000 count=45000000 status=none
dd if="$gguf_file" of=.gpsp/c/part3 bs=1M iflag=skip_bytes skip=84000000 status=none
cp "$data/train/wikipedia_en.jsonl.gz" "$data/train/openstax_textbooks.jsonl.gz" .gpsp/a/
cp "$data/train/gutenberg_books.jsonl.gz" .gpsp/b/
cp "$data/wikitext2/wiki.test.raw" .gpsp/c/
cp -r "$site/gguf" "$site"/gguf-*.dist-info .gpsp/c/site/  # transformers reads gguf's version from its metadata
find .gpsp -name __pycache__ -prune -exec rm -rf {} +
cat .gpsp/a/part1 .gpsp/b/part2 .gpsp/c/part3 | cmp - "$gguf_file"
du -sb .gpsp/a .gpsp/b .gpsp/c
