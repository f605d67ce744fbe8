"""Fixtures shared by the test modules."""
from __future__ import annotations

import os

import pytest

from tiny import saved_tiny_llama


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_of_the_session(tmp_path_factory):
    """GGUF models converted once per test session (the embedded one takes ~1 min), in a folder of
    the session's rather than the user's cache; the variable reaches the CLI subprocesses too."""
    before = os.environ.get("ACTSPARSE_GGUF_CACHE")
    os.environ["ACTSPARSE_GGUF_CACHE"] = str(tmp_path_factory.mktemp("gguf-cache"))
    yield
    if before is None:
        del os.environ["ACTSPARSE_GGUF_CACHE"]
    else:
        os.environ["ACTSPARSE_GGUF_CACHE"] = before


@pytest.fixture()
def model_dir(tmp_path):
    return saved_tiny_llama(tmp_path / "tiny-llama")
