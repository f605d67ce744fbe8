"""benchmarks/stdlib_corpus.py: every .py file once as a training record, never the language
reference that the built-in evaluation text comes from, never a partial file."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from actsparse.data import read_texts

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "stdlib_corpus.py"


def tree(root: Path) -> Path:
    for name, text in {
        "a.py": "def a():\n    return 1\n",
        "pkg/b.py": '"""b"""\nB = 2\n',
        "pkg/README.txt": "not code",
        "pydoc_data/topics.py": "topics = {'the reference': '...'}\n",
        "site-packages/x.py": "import x\n",
        "test/test_a.py": "assert True\n",
        "__pycache__/a.py": "stale\n",
    }.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_corpus_holds_each_source_once_and_leaves_out_the_reference(tmp_path):
    root, out = tree(tmp_path / "lib"), tmp_path / "code.jsonl.gz"
    done = run(str(out), "--root", str(root))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["files"] == 3 and summary["chars"] == len("def a():\n    return 1\n" '"""b"""\nB = 2\n' "assert True\n")
    assert read_texts(out) == ["def a():\n    return 1\n", '"""b"""\nB = 2\n', "assert True\n"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code.jsonl.gz", "lib"]

    assert run(str(out), "--root", str(root), "--no-tests").returncode == 0
    assert len(read_texts(out)) == 2


def test_nothing_to_read_is_an_error_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    done = run(str(tmp_path / "code.jsonl.gz"), "--root", str(tmp_path / "empty"))
    assert done.returncode == 1 and "no .py files to read" in done.stderr
    done = run(str(tmp_path / "code.jsonl.gz"), "--root", str(tmp_path / "nope"))
    assert done.returncode == 1 and "--root" in done.stderr and "no such folder" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_an_output_folder_that_does_not_exist_is_named(tmp_path):
    root = tree(tmp_path / "lib")
    done = run(str(tmp_path / "nope" / "code.jsonl.gz"), "--root", str(root))
    assert done.returncode == 1 and f"its folder {tmp_path / 'nope'} does not exist" in done.stderr
