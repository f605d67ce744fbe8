"""Fixtures shared by the test modules."""
from __future__ import annotations

import os

import pytest
import torch

from tiny import saved_tiny_llama


def pytest_configure(config):
    """Under pytest-xdist, each worker's torch (and the CLI subprocesses it starts) takes its share
    of the cores: workers that each spread over every core slow one another down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


def pytest_collection_modifyitems(config, items):
    """The tests marked `long` first: xdist hands the others out as workers free up, so no long
    test starts last while the other worker sits idle (make test sends two tests at a time)."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_of_the_session(tmp_path_factory):
    """GGUF models converted once per test run (the embedded one takes ~1 min), in a folder of the
    run's rather than the user's cache, which pytest-xdist's workers share (the first to load a
    file converts it, the others wait for its copy); the variable reaches the CLI subprocesses too."""
    before = os.environ.get("ACTSPARSE_GGUF_CACHE")
    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_folder = run_folder.parent  # each worker's folder sits in the run's
    os.environ["ACTSPARSE_GGUF_CACHE"] = str(run_folder / "gguf-cache")
    yield
    if before is None:
        del os.environ["ACTSPARSE_GGUF_CACHE"]
    else:
        os.environ["ACTSPARSE_GGUF_CACHE"] = before


@pytest.fixture()
def model_dir(tmp_path):
    return saved_tiny_llama(tmp_path / "tiny-llama")
