"""actsparse eval DIR_OR_MODEL [--ppl FILE] [--windows N] [--seq-len L] [--tasks a,b] [--task-dir DIR] [--include-path DIR] [--limit N] [--backend auto|kernels|torch] [--json OUT]"""
from __future__ import annotations

from ..config import DenseConfig
from ..data import read_texts
from ..errors import ActSparseError
from ..evaluate import perplexity
from ..loading import load_model, parse_dtype
from ..measure import measure_sparsity
from ..methods import sparsify_
from ..outputs import check_file_output, write_json_atomic
from ..runtime import resolve_backend, use_kernels
from ._common import add_backend, add_model, check_positive, parse_list


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, zero-shot accuracy and measured sparsity")
    add_model(p, "model to evaluate")
    add_backend(p)
    p.add_argument("--ppl", metavar="FILE", help="perplexity text: .raw/.txt, .jsonl[.gz], .parquet, or 'wikitext2' (hub, online)")
    p.add_argument("--windows", type=int, default=None, metavar="N", help="first N windows only (default: all)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L", help="window length in tokens (default 512)")
    p.add_argument("--tasks", default=None, help="zero-shot tasks, e.g. piqa,arc_easy")
    p.add_argument("--task-dir", default=None, help="folder of the task JSONL files (default $ACTSPARSE_TASK_DIR or ../shared/data/tasks)")
    p.add_argument("--include-path", default=None, metavar="DIR",
                   help="your own lm-eval task YAML(s) over local JSONL/parquet files; their task names join --tasks")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="documents per task")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON")
    p.set_defaults(func=run)


def evaluate_model(model, tokenizer, args) -> dict:
    """The eval results dict of the CLI contract, for a loaded (possibly sparse) model."""
    if getattr(model, "actsparse_config", None) is None:
        sparsify_(model, DenseConfig())  # same modules, so sparsity is measured (0) the same way
    param = next(model.parameters())
    use_kernels(model, resolve_backend(args.backend, param.device, param.dtype))
    config = model.actsparse_config
    result = {"method": config.method, "config": config.to_dict(), "ppl": None, "ppl_windows": 0,
              "seq_len": args.seq_len, "sparsity": None, "tasks": {}}
    if args.ppl:
        ppl = perplexity(model, tokenizer, args.ppl, args.seq_len, args.windows)
        result.update(ppl=ppl["ppl"], ppl_windows=ppl["ppl_windows"], sparsity=ppl["sparsity"], ppl_text=str(args.ppl))
    if args.tasks:
        from ..zeroshot import evaluate_tasks

        with measure_sparsity(model) as meter:
            scores = evaluate_tasks(model, tokenizer, parse_list(args.tasks, "--tasks"), args.task_dir, args.limit,
                                    include_path=args.include_path)
        result["tasks"] = {name: s["acc"] for name, s in scores.items()}
        result["task_details"] = scores
        result["task_sparsity"] = meter.report().to_dict()  # measured on the task texts
    return result


def run(args) -> int:
    if not args.ppl and not args.tasks:
        raise ActSparseError("nothing to evaluate: give --ppl FILE and/or --tasks a,b")
    check_positive("--windows", args.windows)
    check_positive("--limit", args.limit)
    resolve_backend(args.backend, args.device, parse_dtype(args.dtype))  # a bad pair fails before loading
    if args.ppl and args.ppl != "wikitext2":
        read_texts(args.ppl)  # a bad file fails before the model loads
    if args.json:
        check_file_output(args.json, "--json")
    if args.tasks:  # a bad task name or data file is reported before the model is loaded
        from ..zeroshot import resolve_tasks

        resolve_tasks(parse_list(args.tasks, "--tasks"), args.task_dir, args.include_path)
    model, tokenizer = load_model(args.model, parse_dtype(args.dtype), args.device)
    if tokenizer is None:
        raise ActSparseError(f"{args.model}: no tokenizer saved with the model")
    result = evaluate_model(model, tokenizer, args)
    print(format_result(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0


def format_result(r: dict) -> str:
    lines = [f"method     {r['method']}"]
    if r["ppl"] is not None:
        s = r["sparsity"]
        lines += [
            f"perplexity {r['ppl']:.3f}  ({r['ppl_windows']} windows of {r['seq_len']} tokens)",
            f"sparsity   model {s['model']:.3f}  mlp {s['mlp']:.3f}  attention {s['attn']:.3f}  (measured)",
        ]
    for name, acc in r["tasks"].items():
        lines.append(f"{name:<10} acc {acc:.4f}")
    return "\n".join(lines)
