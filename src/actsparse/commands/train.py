"""actsparse train [MODEL] --method prosparse --data FILE[,FILE...] [--steps N] [--seq-len L]
[--batch-size B] [--schedule progressive|constant] [--time-limit SECONDS] [--compile] [--resume DIR] -o DIR

Runs unchanged on several devices: torchrun --nproc_per_node N -m actsparse.cli train ...
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import make_config
from ..data import read_texts
from ..errors import ActSparseError
from ..io import save
from ..loading import load_model
from ..outputs import check_file_output, check_output, write_json_atomic
from ._common import check_positive, log, parse_list, parse_stages

METHODS = ("prosparse",)


def register(sub) -> None:
    p = sub.add_parser("train", help="ProSparse: ReLU-fy a model and train it sparse (L1 schedule), then save it")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="a local HF directory, a .gguf file or a hub id (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", default="prosparse", help="training method (only prosparse)")
    p.add_argument("--data", required=True, metavar="FILE[,FILE...]",
                   help="training text: .txt/.raw, .jsonl[.gz] ({\"text\": ...}) or .parquet files")
    p.add_argument("--steps", type=int, default=1000, metavar="N", help="optimizer steps (default 1000)")
    p.add_argument("--seq-len", type=int, default=1024, metavar="L", help="packed sequence length (default 1024)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="sequences per micro-batch per device (default 8)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="K", help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, warm-up then cosine; default 1e-4)")
    p.add_argument("--schedule", default="progressive", help="progressive (default) or constant lambda (the ablation)")
    p.add_argument("--preset", default="7b", help="paper stage table scaled to --steps: 7b (default) or 1b")
    p.add_argument("--stages", default=None, metavar="END:LAMBDA,...",
                   help="own stage table instead of --preset, e.g. 0.3:0,0.36:0.005,0.6:0.05,0.73:0.05,0.97:0.2,1:0.2 "
                        "(ends in any unit, scaled to --steps; the first lambda is 0: the ReLU swap alone)")
    p.add_argument("--peak-lambda", type=float, default=None, help="rescale the table so its last lambda is this")
    p.add_argument("--l1-reduce", default="sum", help="combine per-layer L1 terms by sum (default) or mean")
    p.add_argument("--threshold", type=float, default=0.01, help="FATReLU threshold at inference (default 0.01; 0 = ReLU)")
    p.add_argument("--train-threshold", type=float, default=0.0,
                   help="FATReLU threshold while training (default 0: plain ReLU, the threshold shifted at inference only)")
    p.add_argument("--distill", type=float, default=0.0, metavar="W",
                   help="weight in [0, 1] of the KL to the original (SiLU) model's next-token distribution in the loss "
                        "(default 0: plain LM loss)")
    p.add_argument("--distill-hidden", type=float, default=0.0, metavar="W",
                   help="weight (>= 0) of the normalized MSE to the original (SiLU) model's per-layer hidden states, "
                        "added to the loss (default 0: off)")
    p.add_argument("--log-every", type=int, default=10, metavar="N", help="log every N steps (default 10)")
    p.add_argument("--save-every", type=int, default=0, metavar="N", help="checkpoint every N steps (default 0: none)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    p.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast (default: on for CUDA)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in fp32")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop training after this many seconds at a checkpoint, without saving the model; "
                        "continue with --resume (default: no limit)")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (default: eager)")
    p.add_argument("--device", default=None, help="torch device (default: CUDA when available; under torchrun, one GPU per rank)")
    p.add_argument("--resume", metavar="DIR", help="a checkpoint directory, or a training directory to resume from its latest")
    p.add_argument("--train-dir", metavar="DIR", help="checkpoints and train_log.csv (default: OUTPUT.train)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory for the trained model")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--json", metavar="OUT", help="write the training summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train import TrainArgs, finished, pack_texts, setup, train_prosparse
    from ..train.checkpoint import checkpoint_dir, find_checkpoint
    from ..train.checkpoint import read_meta as read_checkpoint_meta

    if args.method not in METHODS:
        raise ActSparseError(f"--method {args.method!r} cannot be trained; trainable methods: {', '.join(METHODS)}")
    config = make_config("prosparse", threshold=args.threshold, train_threshold=args.train_threshold,
                         schedule=args.schedule, preset=args.preset, peak_lambda=args.peak_lambda,
                         stages=parse_stages(args.stages) if args.stages else (), l1_reduce=args.l1_reduce)
    check_positive("--seq-len", args.seq_len)
    train_args = TrainArgs(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                           log_every=args.log_every, save_every=args.save_every, seed=args.seed, bf16=args.bf16,
                           distill=args.distill, distill_hidden=args.distill_hidden, time_limit=args.time_limit,
                           compile=args.compile)
    output = check_output(args.output, args.overwrite)  # --resume too: a user's files stay unless --overwrite
    if args.json:
        check_file_output(args.json, "--json")
    sources = parse_list(args.data, "--data")
    for source in sources:
        read_texts(source)  # a bad file fails before the model loads
    if args.resume:
        found = find_checkpoint(args.resume)
        read_checkpoint_meta(found)  # a damaged checkpoint fails before the model loads
    dist = setup(args.device)
    model, tokenizer = load_model(args.model, device=str(dist.device))
    windows = pack_texts(tokenizer, sources, args.seq_len)
    if dist.is_main:
        log(f"{windows.shape[0]} windows of {args.seq_len} tokens; {args.steps} steps of "
            f"{args.batch_size * args.grad_accum * dist.world_size} sequences on {dist.world_size} x {dist.device.type}")
    train_dir = Path(args.train_dir) if args.train_dir else output.with_name(output.name + ".train")
    history = train_prosparse(model, windows, config, train_args, train_dir, resume=args.resume, dist=dist)
    complete = finished(history, train_args)
    if dist.is_main:
        last = history[-1] if history else {}
        if complete:
            save(model.to("cpu"), output, tokenizer, overwrite=args.overwrite)
            log(f"saved to {output}; log and checkpoints in {train_dir}")
        else:
            checkpoint = checkpoint_dir(train_dir, last["step"])
            log(f"stopped at the time limit after step {last['step']} of {args.steps}; checkpoint in {checkpoint} "
                f"({output} not written); to continue, run the same command with --resume {train_dir}")
        print(f"steps      {last.get('step', args.steps)}  ({last.get('tokens', 0)} tokens)")
        if last:
            print(f"loss       {last['loss']:.4f}  l1 {last['l1']:.4g}  lambda {last['lambda']:.4g}")
            print(f"sparsity   mlp {last['sparsity']:.3f}  (ReLU zeros on the last training batches)")
        if args.json:
            write_json_atomic(args.json, {"output": str(output) if complete else None, "train_dir": str(train_dir),
                                          "finished": complete, "config": config.to_dict(),
                                          "train_args": json.loads(json.dumps(train_args.__dict__)), "log": history})
    dist.barrier()
    return 0
