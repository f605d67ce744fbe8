"""actsparse's vLLM plugin: `vllm serve DIR` / `vllm.LLM(DIR)` run a directory saved by `actsparse.save`.

`pip install 'actsparse[vllm]'` installs the `vllm.general_plugins` entry point `register`, which
vLLM calls in each of its processes; it registers the `actsparse` quantization method
(`config.ActSparseConfig`) that config.json's ``quantization_config`` names. Supported: threshold
selection (TEAL, WINA, CATS, ProSparse's gate mask); LaRoSA rotations, R-Sparse low-rank terms
and top-K selection are refused by name (`state`).
"""
from __future__ import annotations


def register() -> None:
    from . import config  # noqa: F401  (registers the quantization method with vLLM)
