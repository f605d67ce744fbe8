#!/usr/bin/env bash
# Builds .gpsp/ (ignored through .git/info/exclude) for benchmarks/prosparse_gpu.py on a lent GPU:
#   bash benchmarks/prosparse_gpu_prepare.sh [STUDENT]
# The 98 MB GGUF and the three training files are over the 64 MiB one device call carries (the
# working tree counts too), so they travel in three parts of at most ~54 MB, one call each, while
# the machine stays warm (/tmp persists there; a carried path that a later call does not name is
# not kept, hence the copies):
#   call 1: carry .gpsp/a   command: mkdir -p /tmp/gpsp /tmp/st && cp .gpsp/a/* /tmp/gpsp/
#   call 2: carry .gpsp/b   command: cp .gpsp/b/* /tmp/gpsp/
#   call 3: carry .gpsp/c   command: cp -r .gpsp/c/* /tmp/gpsp/ && cat /tmp/gpsp/part[123] > /tmp/model.gguf && RUN
#   later calls (nothing carried): RUN again, which resumes from the checkpoint under --work
# where RUN stands for the command
#     PYTHONPATH=$PWD/src:/tmp/gpsp/site timeout 590 python3 benchmarks/prosparse_gpu.py --model /tmp/model.gguf \
#       --data /tmp/gpsp/wikipedia_en.jsonl.gz,/tmp/gpsp/openstax_textbooks.jsonl.gz,/tmp/gpsp/gutenberg_books.jsonl.gz \
#       --eval /tmp/gpsp/wiki.test.raw --work /tmp/psw --out $OUT --steps N --deadline 575 ...
# .gpsp/c also holds Python's standard library sources (benchmarks/stdlib_corpus.py, 6 MB): add
# /tmp/gpsp/stdlib_code.jsonl.gz to --data for training text beyond prose.
# Send all of a lease's calls as one batch: the machine goes back after 30 s idle, and /tmp with
# the checkpoint goes with it. Start each later call with `ls /tmp/psw || exit 3` so that one
# finding a fresh machine stops at once.
#
# Training over several leases: RUN with `--export /tmp/psw/student.safetensors`; after the call
# that finished, fetch the student four 15 MB parts per call (64 MiB come back per call), K = 0..4:
#     ls /tmp/psw/student.safetensors || exit 3; mkdir -p /tmp/parts && cd /tmp/parts &&
#     { ls part00 || split -b 15000000 -d -a 2 /tmp/psw/student.safetensors part; } && cp $(ls part* | sed -n A,Bp) $OUT/
# (A = 4K+1, B = 4K+4), join them here in order (`cat part00 part01 ... > student.safetensors`) and
# check its sha256 against the one printed there. Given STUDENT, this script also packs it into
# .gpsp/s1, .gpsp/s2, ... (three parts each); each travels in one more call before call 3
# (`cp .gpsp/sN/* /tmp/st/`), and call 3 joins and checks them (`cat /tmp/st/part* >
# /tmp/student.safetensors && sha256sum -c /tmp/gpsp/student.sha256 || exit 4`) before RUN with
# `--init /tmp/student.safetensors`.
set -euo pipefail
student=${1:-}
if [[ -n "$student" && ! -f "$student" ]]; then
    echo "prosparse_gpu_prepare.sh: $student: no such file (give a student exported with --export)" >&2
    exit 2
fi
[[ -n "$student" ]] && student=$(realpath -- "$student")
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c 'import gguf, pathlib; print(pathlib.Path(gguf.__file__).parents[1])')
gguf_file=$(.venv/bin/python -c 'from actsparse.loading import default_model_path; print(default_model_path())')
data=../shared/data
grep -qx '/.gpsp/' .git/info/exclude 2>/dev/null || echo '/.gpsp/' >> .git/info/exclude
rm -rf .gpsp && mkdir -p .gpsp/a .gpsp/b .gpsp/c/site
dd if="$gguf_file" of=.gpsp/a/part1 bs=1M iflag=count_bytes count=39000000 status=none
dd if="$gguf_file" of=.gpsp/b/part2 bs=1M iflag=skip_bytes,count_bytes skip=39000000 count=45000000 status=none
dd if="$gguf_file" of=.gpsp/c/part3 bs=1M iflag=skip_bytes skip=84000000 status=none
cp "$data/train/wikipedia_en.jsonl.gz" .gpsp/a/
cp "$data/train/gutenberg_books.jsonl.gz" .gpsp/b/
cp "$data/train/openstax_textbooks.jsonl.gz" "$data/wikitext2/wiki.test.raw" .gpsp/c/
cp -r "$site/gguf" "$site"/gguf-*.dist-info .gpsp/c/site/  # transformers reads gguf's version from its metadata
.venv/bin/python benchmarks/stdlib_corpus.py .gpsp/c/stdlib_code.jsonl.gz | tail -1 >/dev/null  # code, for broader training text
find .gpsp -name __pycache__ -prune -exec rm -rf {} +
cat .gpsp/a/part1 .gpsp/b/part2 .gpsp/c/part3 | cmp - "$gguf_file"
if [[ -n "$student" ]]; then
    mkdir .gpsp/parts
    split -b 15000000 -d -a 2 "$student" .gpsp/parts/part
    i=0
    for part in .gpsp/parts/part*; do
        dir=.gpsp/s$((i / 3 + 1))
        mkdir -p "$dir" && mv "$part" "$dir/"
        i=$((i + 1))
    done
    rmdir .gpsp/parts
    (cd "$(dirname "$student")" && sha256sum "$(basename "$student")") | sed 's|  .*|  /tmp/student.safetensors|' > .gpsp/student.sha256
    cp .gpsp/student.sha256 .gpsp/c/
fi
du -sb .gpsp/[a-z]*/
