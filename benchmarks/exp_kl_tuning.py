"""Issue 28 experiment: a method (TEAL by default), then the decoder's linear weights tuned by KL(dense || sparse).

    PYTHONPATH=src python benchmarks/exp_kl_tuning.py [--sparsity 0.4] [--method teal] [--options JSON]
        [--rank 0] [--steps 150] [--lr 1e-5] [--seq-len 256] [--batch 1] [--windows 8]
        [--calib C4_TRAIN.jsonl] [--ppl WIKITEXT.raw] [--second-windows 0] [--second-ppl C4_VAL.jsonl]
        [--no-again] [--schedule constant|cosine]

The embedded SmolLM2 (fp32, CPU) is sparsified with `--method` (its config's fields from
`--options`, a JSON object) on the first 16 x 512 tokens of the calibration text; every
q/k/v/o/gate/up/down weight of the sparse model (its selection state fixed, the torch reference's
masks) is then tuned with Adam for `--steps` steps of `--batch` windows of `--seq-len` tokens
taken after the calibration ones, minimising KL(dense || sparse) of the next-token distributions
(the dense model is the untouched original). Perplexity on the first `--windows` windows of 512
of the evaluation text: the method, tuned with its state kept, and the tuned weights sparsified
again by the method (skipped with `--no-again`); with `--second-windows N`, also a dense row and
every row's perplexity on the first N windows of `--second-ppl`. By default a full-weight tune, which does not fit one GPU at 8B with Adam;
`--rank R` tunes a rank-R update B A of each weight instead and folds it in before evaluating (the
form a method would take at that scale). Prints one line per row, then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import actsparse as asp
from actsparse.evaluate import perplexity
from actsparse.loading import load_model
from actsparse.methods.rsparse_kl import WeightUpdate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--method", default="teal")
    p.add_argument("--options", type=json.loads, default={}, help="fields of the method's config, as a JSON object")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rank", type=int, default=0,
                   help="tune a rank-R update W + B A of each weight (folded in afterwards) instead of the whole weight")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calib", default="../shared/data/c4/c4_train_sample.jsonl")
    p.add_argument("--ppl", default="../shared/data/wikitext2/wiki.test.raw")
    p.add_argument("--second-ppl", default="../shared/data/c4/c4_validation_sample.jsonl")
    p.add_argument("--second-windows", type=int, default=0, help="also this many windows of --second-ppl (0: none)")
    p.add_argument("--no-again", action="store_true", help="skip running the method again on the tuned weights")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate: constant, or cosine decay to zero after 10%% linear warm-up")
    args = p.parse_args()
    torch.manual_seed(0)
    dense, tok = load_model(None)
    dense.eval()
    calib = asp.text_batches(tok, args.calib, n=16, seq_len=512)
    skip = 16 * 512 // args.seq_len
    train = asp.text_batches(tok, args.calib, n=skip + args.steps * args.batch, seq_len=args.seq_len)[skip:]
    train = train.reshape(args.steps, args.batch, args.seq_len)
    config = asp.make_config(args.method, sparsity=args.sparsity, **args.options)

    def ppl(model) -> tuple[float, float] | tuple[float, float, float]:
        r = perplexity(model, tok, args.ppl, 512, args.windows, progress=False)
        sparsity = r["sparsity"]["model"] if r["sparsity"] else 0.0
        if not args.second_windows:
            return r["ppl"], sparsity
        return r["ppl"], sparsity, perplexity(model, tok, args.second_ppl, 512, args.second_windows, progress=False)["ppl"]

    rows = {"dense": ppl(dense)} if args.second_windows else {}
    student = asp.sparsify_(copy.deepcopy(dense), config, calib)
    rows[args.method] = ppl(student)
    for q in student.parameters():
        q.requires_grad_(False)
    linears = [m for n, m in student.named_modules() if ".layers." in n and n.endswith("proj")]
    if args.rank:
        for m in linears:
            parametrize.register_parametrization(m, "weight", WeightUpdate(m.weight, args.rank))
        tuned = [q for m in linears for q in m.parametrizations.weight[0].parameters()]
    else:
        tuned = [m.weight for m in linears]
    for q in tuned:
        q.requires_grad_(True)
    opt = torch.optim.Adam(tuned, lr=args.lr)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 if args.schedule == "constant" else
                                              min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / args.steps))))
    started = time.perf_counter()
    for step, ids in enumerate(train):
        with torch.no_grad():
            teacher = F.log_softmax(dense(input_ids=ids, use_cache=False).logits.float(), -1)
        pupil = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
        kl = (teacher.exp() * (teacher - pupil)).sum(-1).mean()
        opt.zero_grad()
        kl.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"step {step}: KL {kl.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    student.eval()
    if args.rank:
        with torch.no_grad():
            for m in linears:
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    rows["tuned, the method's state kept"] = ppl(student)
    if not args.no_again:
        again = copy.deepcopy(dense)
        weights = dict(student.named_parameters())
        with torch.no_grad():
            for n, q in again.named_parameters():
                q.copy_(weights[n])
        rows["tuned, the method run again"] = ppl(asp.sparsify_(again, config, calib))
    for name, (value, sparsity, *second) in rows.items():
        print(f"{name:<32} ppl {value:8.3f}  sparsity.model {sparsity:.3f}" + (f"  second ppl {second[0]:8.3f}" if second else ""))
    print(json.dumps({**vars(args), "tune_s": time.perf_counter() - started,
                      "rows": {k: {"ppl": v, "sparsity": s, **({"second_ppl": rest[0]} if rest else {})}
                               for k, (v, s, *rest) in rows.items()}}))


if __name__ == "__main__":
    main()
