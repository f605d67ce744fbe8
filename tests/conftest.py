"""Fixtures shared by the test modules."""
from __future__ import annotations

import pytest

from tiny import saved_tiny_llama


@pytest.fixture()
def model_dir(tmp_path):
    return saved_tiny_llama(tmp_path / "tiny-llama")
