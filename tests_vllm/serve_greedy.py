"""Serve one directory with vLLM (in this process) and print one JSON line: the greedy tokens of each
prompt, generated one prompt at a time as actsparse's engine does; with `--score`, vLLM's argmax
at every position of each given sequence (one prefill, its prompt logprobs); and the sparsity
measured inside vLLM (`actsparse.vllm_plugin.measure`). Run by test_vllm_serving.py, one process
per directory."""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("ACTSPARSE_VLLM_MEASURE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from actsparse.vllm_plugin.measure import collect  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--prompts", required=True, help="JSON list of token id lists")
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--score", default="[]", help="JSON list of token id lists")
    args = parser.parse_args()
    llm = LLM(args.directory, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    tokens = []
    for ids in json.loads(args.prompts):
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        tokens.append(list(out[0].outputs[0].token_ids))
    argmax = []
    for ids in json.loads(args.score):
        scored = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=1),
                              use_tqdm=False)
        argmax.append([next(t for t, lp in pos.items() if lp.rank == 1) for pos in scored[0].prompt_logprobs[1:]])
    print(json.dumps({"tokens": tokens, "argmax": argmax, "sparsity": llm.apply_model(collect)[0]}))


if __name__ == "__main__":
    main()
