"""actsparse bench [DIR_OR_MODEL] --device cuda|cpu [--shape NAME] [--method M] [--sparsity S] [--option K=V] [--batch B] [--dtype D] [--tokens N] [--backend auto|kernels|torch] [--json OUT]

A dense model is decoded dense, then sparsified by `sparsify_` with the method's own config and
calibration (random tokens for a random-weight --shape, the calibration text otherwise) and decoded
again in a fresh engine; an actsparse directory keeps its own state and is decoded dense (its
modules set dense for the run) and sparse."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import make_config
from ..data import read_texts, text_batches, tokenize_texts
from ..engine import DecodeEngine
from ..errors import ActSparseError
from ..kernels import tuning
from ..loading import is_actsparse_dir, load_model, parse_dtype
from ..methods import sparsify_
from ..nn import dense_baseline
from ..outputs import check_file_output, write_json_atomic
from ..runtime import resolve_backend, use_kernels
from ..speed import (
    SHAPES, check_fits, environment, hf_generate_speed, measured_report, random_calibration, random_model,
    read_bytes, rotation_reads, speed_result, timed_decode,
)
from ..swap import swap_modules
from ._common import (
    DEFAULT_CALIB, DEFAULT_EVAL, add_backend, add_method_options, check_positive, log, method_fields,
)


def register(sub) -> None:
    p = sub.add_parser("bench", help="decode speed, dense against sparse, on one engine")
    p.add_argument("model", nargs="?", default=None, metavar="DIR_OR_MODEL",
                   help="a model or actsparse directory (default: the embedded SmolLM2 on the CPU, "
                        "a random-weight --shape on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu (default) or cuda")
    add_backend(p)
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random weights of a published shape (default on CUDA: llama3-8b)")
    p.add_argument("--method", default=None,
                   help="the method that sparsifies a dense model (default teal; any of `actsparse sparsify`'s); "
                        "an actsparse directory keeps its own")
    p.add_argument("--sparsity", type=float, default=None,
                   help="target sparsity for a dense model (default 0.5); an actsparse directory keeps its own")
    add_method_options(p)
    p.add_argument("--batch", type=int, default=1, help="prompts decoded together, at most 8 (default 1)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on the CPU, bf16 on CUDA)")
    p.add_argument("--tokens", type=int, default=128, metavar="N", help="new tokens per prompt (default 128)")
    p.add_argument("--prompt-len", type=int, default=32, metavar="L", help="prompt tokens (default 32)")
    p.add_argument("--decode", default="text", choices=("text", "greedy"),
                   help="text (default): every step feeds the next token of a fixed text (the evaluation text "
                        "after each prompt; random tokens for a random-weight model), so dense and sparse decode "
                        "the same tokens and the sparsity is measured on them; greedy: each path feeds its own "
                        "argmax (a model that falls into a repeated token reads as sparser and faster)")
    p.add_argument("--repeats", type=int, default=3, help="timed decodes per path; the fastest counts (default 3)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads: the kernels' with CPU kernels on (torch's own ops then run on one), else "
                        "torch's (default: 1 kernel thread, or torch's choice)")
    p.add_argument("--quick-compile", action="store_true",
                   help="on the CPU, compile the decode step with Inductor's Python wrapper: a shorter first "
                        "compile, a slower decode (default: its C++ wrapper)")
    p.add_argument("--hf-baseline", action="store_true",
                   help="also time transformers' own generate (static cache + torch.compile on CUDA)")
    p.add_argument("--tune-budget-s", type=float, default=None, metavar="S",
                   help="CUDA: seconds at most of re-choosing launch configs inside each decode path's step, "
                        "largest kernels first (default: every kernel; R-Sparse at 8B has ~10 to try)")
    p.add_argument("--tuning-cache", metavar="FILE",
                   help="CUDA: kernel launch choices read from FILE when it exists (the same GPU model and Triton "
                        "only) instead of timing them again, and written back to it after the run")
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    p.set_defaults(func=run)


def _check(args) -> None:
    """Refuse bad arguments before any slow work; a dense model gets --method/--sparsity defaults."""
    args.config = None
    if args.model is not None and is_actsparse_dir(Path(args.model)):
        given = [f"--{k}" for k in ("method", "sparsity", "selection", "allocation") if getattr(args, k) is not None]
        given += ["--option"] if args.option else []
        if given:
            raise ActSparseError(f"{args.model}: already sparsified (an actsparse directory); "
                                 f"{' and '.join(given)} apply to a dense model only")
    else:
        args.method = args.method or "teal"
        args.sparsity = 0.5 if args.sparsity is None else args.sparsity
        if not 0.0 < args.sparsity < 1.0:
            raise ActSparseError(f"--sparsity must be in (0, 1), got {args.sparsity}")
        args.config = make_config(args.method, sparsity=args.sparsity, **method_fields(args, [args.method]))
    if not 1 <= args.batch <= 8:
        raise ActSparseError(f"--batch must be 1..8 (the kernels' decode batch), got {args.batch}")
    for name in ("tokens", "prompt_len", "repeats", "threads"):
        check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.tune_budget_s is not None and not args.tune_budget_s >= 0:
        raise ActSparseError(f"--tune-budget-s must be a number of seconds >= 0, got {args.tune_budget_s}")
    if args.tokens < 8:
        raise ActSparseError(f"--tokens must be at least 8, got {args.tokens}")
    if args.model is not None and args.shape is not None:
        raise ActSparseError("give a model or --shape, not both")
    if args.json:
        check_file_output(args.json, "--json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ActSparseError("--device cuda: no CUDA device is visible")
    if args.tuning_cache:
        if args.device != "cuda":
            raise ActSparseError("--tuning-cache: only CUDA decoding tunes its kernels (add --device cuda)")
        check_file_output(args.tuning_cache, "--tuning-cache")
        if Path(args.tuning_cache).exists():
            log(f"kernel choices from {args.tuning_cache}: {tuning.load(args.tuning_cache)} problems")


def _windows(tokenizer, batch: int, length: int, tokens: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` different prompts of `length` tokens and the `tokens` that follow each: windows of the
    evaluation text, or random tokens without a tokenizer."""
    size = length + tokens
    if tokenizer is None:
        ids = torch.randint(0, vocab, (batch * size,), generator=torch.Generator().manual_seed(0))
    else:
        ids = tokenize_texts(tokenizer, read_texts(DEFAULT_EVAL), max_tokens=batch * size)
        if ids.numel() < batch * size:
            raise ActSparseError(f"the evaluation text has {ids.numel()} tokens; {batch} prompts of {length} and "
                                 f"{tokens} new tokens each need {batch * size}")
    windows = ids[: batch * size].reshape(batch, size)
    return windows[:, :length], windows[:, length:]


def run(args) -> int:
    _check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    kernels = resolve_backend(args.backend, device, dtype)
    backend = f"{device.type} kernels" if kernels else "torch reference"
    kernel_path = None
    if kernels and device.type == "cpu":
        from ..kernels import cpu_ops

        cpu_ops.set_threads(args.threads or 1)
        # The kernels' own pool carries the threads; torch's small ops around them run faster on
        # one (SmolLM2 fp32, 2 threads, dense: 19.0 tok/s with torch on 2, 35.7 on 1; BENCHMARKS.md, CPU).
        torch.set_num_threads(1)
        kernel_path = cpu_ops.isa()
        backend = (f"cpu kernels ({kernel_path}, {str(dtype).removeprefix('torch.')} weights, fp32 accumulation, "
                   f"{args.threads or 1} thread{'s' if (args.threads or 1) > 1 else ''})")
    random_weights = args.model is None and (args.shape is not None or device.type == "cuda")
    if random_weights:
        shape = args.shape or "llama3-8b"
        check_fits(shape, dtype, device, kernels)
        log(f"building a random-weight {shape} ({dtype}) on {device}")
        model, tokenizer, what = random_model(shape, dtype, device), None, f"{shape} (random weights)"
    else:
        model, tokenizer = load_model(args.model, dtype, str(device))
        what = args.model or "SmolLM2-135M-Instruct (embedded)"
    loaded_sparse = getattr(model, "actsparse_config", None) is not None
    prompts, text = _windows(tokenizer, args.batch, args.prompt_len, args.tokens, model.config.vocab_size)
    text = text if args.decode == "text" else None

    result = {"model": what, "method": None, "target_sparsity": None, "device": device.type,
              "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens, "prompt_len": args.prompt_len,
              "decode": args.decode,
              "backend": backend, "kernel_path": kernel_path, "quick_compile": args.quick_compile, **environment(device)}
    if args.hf_baseline and not loaded_sparse:
        log("timing transformers' generate (dense)")
        result["hf_tok_s"] = hf_generate_speed(model, prompts, args.tokens)
    swap_modules(model)
    use_kernels(model, kernels)  # the dense run too: on the CPU its linears and LM head run the dense kernel
    engine_options = {"max_len": args.prompt_len + args.tokens, "batch_size": args.batch, "compile": True,
                      "inductor_options": {} if args.quick_compile and device.type == "cpu" else None}
    engine = DecodeEngine(model, **engine_options)
    if device.type == "cpu" and not args.quick_compile:
        log("the first decode compiles the step with a C++ wrapper, which takes longer the first time on this "
            "machine (cached after; --quick-compile for a shorter compile and a slower decode)")
    result.update(decode_attention=engine.decode_attention, dependent_launch=engine.dependent_launch)
    log("dense decode")
    # A saved LaRoSA model's rotations stay in its dense baseline (they are folded into its weights).
    result["dense_baseline"] = "the saved model, its modules dense" if loaded_sparse else "the dense model"
    if loaded_sparse:
        with dense_baseline(model):
            dense = timed_decode(engine, prompts, args.tokens, args.repeats, tune_budget_s=args.tune_budget_s, text=text)
        config = model.actsparse_config
    else:
        dense = timed_decode(engine, prompts, args.tokens, args.repeats, tune_budget_s=args.tune_budget_s, text=text)
        config = args.config
        log(f"sparsify: {config.method} at {config.sparsity:g}")
        calibration = (random_calibration(model) if random_weights
                       else text_batches(tokenizer, DEFAULT_CALIB, n=8, seq_len=256))
        use_kernels(model, False)  # calibration runs the torch reference, as `sparsify` does
        started = time.perf_counter()
        sparsify_(model, config, calibration)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["sparsify_s"] = time.perf_counter() - started
    result.update(method=config.method, target_sparsity=config.sparsity, config=config.to_dict(),
                  dense_untuned_in_step=list(engine.untuned))
    use_kernels(model, kernels)
    del engine  # a method may have replaced modules (LaRoSA's norms): the sparse model gets its own engine
    engine = DecodeEngine(model, **engine_options)
    log(f"sparse decode ({backend})")
    sparse = timed_decode(engine, prompts, args.tokens, args.repeats, tune_budget_s=args.tune_budget_s, text=text)
    result["sparse_untuned_in_step"] = list(engine.untuned)
    sequence = torch.cat([prompts, sparse.tokens], dim=1)
    report = measured_report(model, sequence)
    sparsity = report.model
    result.update(sparsity_mlp=report.mlp, target_kind=type(config).targets,
                  measured_target=report.mlp if type(config).targets == "mlp" else report.model)
    linear_bytes, other_bytes = read_bytes(model)
    result.update(speed_result(dense, sparse, sparsity, linear_bytes, other_bytes, args.batch, rotation_reads(model)))
    print(format_result(result))
    if args.tuning_cache:
        tuning.save(args.tuning_cache)
    if args.json:
        write_json_atomic(args.json, result)
    print(json.dumps(result))
    return 0


def format_result(r: dict) -> str:
    steps = lambda tok_s: 1e3 * r["batch"] / tok_s
    lines = [
        f"{r['model']} · {r['dtype']} · batch {r['batch']} · {r['device_name']} · "
        f"{r['tokens']} new tokens after {r['prompt_len']} ({'fed from a text' if r['decode'] == 'text' else 'greedy'}) · "
        f"{r['method']} via {r['backend']}",
        f"{'path':<8}{'sparsity':>10}{'tok/s':>10}{'ms/step':>10}{'GB/s':>9}",
        f"{'dense':<8}{0.0:>10.3f}{r['dense_tok_s']:>10.1f}{steps(r['dense_tok_s']):>10.2f}{r['dense_gb_s']:>9.1f}",
        f"{'sparse':<8}{r['sparsity']:>10.3f}{r['sparse_tok_s']:>10.1f}{steps(r['sparse_tok_s']):>10.2f}{r['sparse_gb_s']:>9.1f}",
    ]
    if "hf_tok_s" in r:
        lines.append(f"{'hf':<8}{0.0:>10.3f}{r['hf_tok_s']:>10.1f}{steps(r['hf_tok_s']):>10.2f}")
    lines.append(
        f"speed-up {r['speedup']:.2f}x · ideal {r['ideal_speedup']:.2f}x at measured sparsity {r['sparsity']:.3f} "
        f"(f = {r['sparsified_byte_fraction']:.2f}) · {100 * r['fraction_of_ideal']:.0f}% of ideal"
    )
    target = f"target {r['target_sparsity']:g} of {r['target_kind']} sparsity, measured {r['measured_target']:.3f}"
    sparsify = f" · sparsified in {r['sparsify_s']:.1f} s" if "sparsify_s" in r else ""
    lines.append(target + (f" (mlp {r['sparsity_mlp']:.3f})" if r["target_kind"] == "model" else "") + sparsify)
    return "\n".join(lines)
