"""actsparse generate [DIR_OR_MODEL] "prompt" [--max-new-tokens N] [--backend auto|kernels|torch]"""
from __future__ import annotations

from ..engine import DecodeEngine
from ..errors import ActSparseError
from ..loading import load_model, parse_dtype
from ..runtime import resolve_backend, use_kernels
from ..swap import swap_modules
from ._common import add_backend, check_positive, log


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text (greedy) with a dense or sparsified model")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model (default: embedded SmolLM2), then the prompt")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    add_backend(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if len(args.args) > 2:
        raise ActSparseError("generate takes at most a model and one prompt (quote the prompt)")
    model_arg, prompt = (None, args.args[0]) if len(args.args) == 1 else args.args
    if not prompt.strip():
        raise ActSparseError("the prompt is empty")
    check_positive("--max-new-tokens", args.max_new_tokens)
    dtype = parse_dtype(args.dtype)
    kernels = resolve_backend(args.backend, args.device, dtype)  # a bad pair fails before loading
    model, tokenizer = load_model(model_arg, dtype, args.device)
    if tokenizer is None:
        raise ActSparseError(f"{model_arg}: no tokenizer saved with the model")
    device = next(model.parameters()).device
    swap_modules(model)  # a dense model too, so that it runs through the same modules
    log(f"decoding with {f'the {device.type} kernels' if kernels else 'the torch reference'}")
    use_kernels(model, kernels)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    engine = DecodeEngine(model, max_len=ids.shape[1] + args.max_new_tokens)
    new = engine.generate(ids, args.max_new_tokens).tokens[0].tolist()
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    print(prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0
