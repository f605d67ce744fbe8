"""actsparse generate [DIR_OR_MODEL] "prompt" [--max-new-tokens N]"""
from __future__ import annotations

from ..errors import ActSparseError
from ..generation import generate_text
from ..loading import load_model, parse_dtype
from ._common import check_positive


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (greedy) with a dense or sparsified model")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model (default: embedded SmolLM2), then the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def run(args) -> int:
    if len(args.args) > 2:
        raise ActSparseError("generate takes at most a model and one prompt (quote the prompt)")
    model_arg, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    if not prompt.strip():
        raise ActSparseError("the prompt is empty")
    check_positive("--max-new-tokens", args.max_new_tokens)
    model, tokenizer = load_model(model_arg, parse_dtype(args.dtype), args.device)
    if tokenizer is None:
        raise ActSparseError(f"{model_arg}: no tokenizer saved with the model")
    print(prompt + generate_text(model, tokenizer, prompt, args.max_new_tokens))
    return 0
