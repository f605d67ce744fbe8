"""Every `benchmarks/results/...` path and every `FILE.md#heading` link the documents name exists, and
benchmarks/results/ keeps one naming scheme."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCUMENTS = ("README.md", "BENCHMARKS.md", "BENCHMARKS_HISTORY.md", "KERNELS_NOTES.md")
PATH = re.compile(r"benchmarks/results/[^\s`'\"()\[\]<>|]*")
ANCHOR_LINK = re.compile(r"\]\(([A-Za-z_]*\.md)?#([^)\s]+)\)")
DEVICES = ("h200", "h100", "cpu")


def expand_braces(path: str) -> list[str]:
    """`a_{1,2}.{json,log}` -> the four paths it stands for, as a shell would expand it."""
    parts = re.split(r"(\{[^{}]*\})", path)
    choices = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*choices)]


def mentioned_paths(text: str) -> list[str]:
    return [m.group(0).rstrip(".,;:") for m in PATH.finditer(text)]


def missing(path: str) -> list[str]:
    absent = []
    for one in expand_braces(path):
        rel = one[len("benchmarks/results/"):]
        if "*" in one:
            if not list(RESULTS.glob(rel)):
                absent.append(one)
        elif not (RESULTS / rel).exists():
            absent.append(one)
    return absent


def test_expand_braces_and_missing_detect_a_bad_path():
    assert expand_braces("r/a_{1,2}.{json,log}") == ["r/a_1.json", "r/a_1.log", "r/a_2.json", "r/a_2.log"]
    assert missing("benchmarks/results/README.md") == []
    assert missing("benchmarks/results/gpu_matrix/no_such_run.{json,log}") == [
        "benchmarks/results/gpu_matrix/no_such_run.json", "benchmarks/results/gpu_matrix/no_such_run.log"]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_results_path_in_the_document_exists(document):
    text = (ROOT / document).read_text()
    absent = [p for path in mentioned_paths(text) for p in missing(path)]
    assert absent == [], f"{document} names result files that do not exist: {absent}"


def heading_anchors(text: str) -> set[str]:
    """GitHub's ids for the document's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_heading_anchors_follow_github():
    assert heading_anchors("# A b\n```\n# not one\n```\n### GPU runs 9-10: x (2026-11-24)\n") == {
        "a-b", "gpu-runs-9-10-x-2026-11-24"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_heading_link_in_the_document_exists(document):
    text = (ROOT / document).read_text()
    broken = [f"{target}#{anchor}" for target, anchor in ANCHOR_LINK.findall(text)
              if anchor not in heading_anchors((ROOT / (target or document)).read_text())]
    assert broken == [], f"{document} links to headings that do not exist: {broken}"


def test_results_follow_one_naming_scheme():
    """<benchmark>/<benchmark>[_<part>]_<device>_<YYYY-MM-DD>[_<variant>][.<ext>] (results/README.md)."""
    bad = []
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        name = re.compile(rf"{folder.name}(_[a-z]+)?_({'|'.join(DEVICES)})_\d{{4}}-\d{{2}}-\d{{2}}(_[a-z0-9.-]+)?(\.[a-z]+)?")
        bad += [str(e.relative_to(RESULTS)) for e in folder.iterdir() if not name.fullmatch(e.name)]
    loose = [p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"]
    assert bad == [] and loose == [], f"outside the naming scheme: {bad + loose}"
