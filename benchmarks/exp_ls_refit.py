"""Issue 28 experiment: TEAL, then every linear's weight refit by least squares on what it keeps.

    PYTHONPATH=src python benchmarks/exp_ls_refit.py [--sparsity 0.4] [--target dense|own]
        [--ridge 0.01] [--token-weight] [--fit 16] [--windows 8]

The embedded SmolLM2 (fp32, CPU) is sparsified with TEAL on the first 16 x 512 tokens of the C4
train sample; then, one decoder layer at a time and one input group at a time (q/k/v, o,
gate/up, down), each weight W becomes the ridge solution of
``min_W' sum_t |W x*_t - W' (m_t * x_t)|^2 + lam |W' - W|^2`` over the next `--fit` windows of 512:
x_t the sparse model's input to the linear (layers before already refit), m_t its TEAL mask,
x*_t the dense model's input there (`--target dense`: also undo the error carried from earlier
layers) or x_t itself (`--target own`: only predict the dropped channels from the kept ones);
lam = `--ridge` times the mean of the Gram diagonal; `--token-weight` divides each token by
|x_t| so that the few tokens with huge activations do not decide the fit. Perplexity on the
first `--windows` windows of 512 of WikiText-2 test, TEAL's thresholds kept. Prints one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import actsparse as asp
from actsparse.evaluate import perplexity
from actsparse.loading import load_model

GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
          ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))


class _Caught(Exception):
    pass


def first_layer_inputs(model, batches) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, keyword arguments) that the first decoder layer receives, per batch."""
    got = []

    def catch(module, args, kwargs):
        got.append((args[0], kwargs))
        raise _Caught

    handle = model.model.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    for ids in batches:
        try:
            model(input_ids=ids, use_cache=False)
        except _Caught:
            pass
    handle.remove()
    return got


def run_layer(layer, stream):
    outputs = []
    for h, kwargs in stream:
        out = layer(h, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, kwargs))
    return outputs


def inputs_of(layer, name, stream) -> list[torch.Tensor]:
    seen = []
    handle = layer.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    run_layer(layer, stream)
    handle.remove()
    return seen


def refit_group(dense_layer, sparse_layer, group, dense_stream, sparse_stream, args) -> None:
    targets = iter(inputs_of(dense_layer, group[0], dense_stream)) if args.target == "dense" else None
    gram, cross = 0, 0

    def accumulate(module, a):
        nonlocal gram, cross
        x = a[0].reshape(-1, a[0].shape[-1])
        kept = (x * module.mask(x)).double()
        target = next(targets) if targets is not None else x.double()
        if args.token_weight:
            w = 1 / (x.double().norm(dim=1, keepdim=True) + 1e-6)
            kept, target = kept * w, target * w
        gram = gram + kept.T @ kept
        cross = cross + target.T @ kept

    handle = sparse_layer.get_submodule(group[0]).register_forward_pre_hook(accumulate)
    run_layer(sparse_layer, sparse_stream)
    handle.remove()
    lam = args.ridge * gram.diagonal().mean()
    regularised = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    for name in group:
        w = dense_layer.get_submodule(name).weight.double()
        module = sparse_layer.get_submodule(name)
        module.weight.copy_(torch.linalg.solve(regularised, (w @ cross + lam * w).T).T.to(module.weight.dtype))
        module.set_threshold(module.threshold.item(), module.target, module.score_scale)  # repacks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sparsity", type=float, default=0.4)
    p.add_argument("--target", choices=("dense", "own"), default="dense")
    p.add_argument("--ridge", type=float, default=1e-2)
    p.add_argument("--token-weight", action="store_true")
    p.add_argument("--fit", type=int, default=16, help="windows of 512 C4-train tokens for the fit")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--calib", default="../shared/data/c4/c4_train_sample.jsonl")
    p.add_argument("--ppl", default="../shared/data/wikitext2/wiki.test.raw")
    args = p.parse_args()
    torch.manual_seed(0)
    dense, tok = load_model(None)
    dense.eval()
    windows = asp.text_batches(tok, args.calib, n=16 + args.fit, seq_len=512)
    sparse = asp.sparsify_(copy.deepcopy(dense), asp.TealConfig(sparsity=args.sparsity), windows[:16])

    def ppl(model) -> dict:
        r = perplexity(model, tok, args.ppl, 512, args.windows, progress=False)
        return {"ppl": r["ppl"], "sparsity": r["sparsity"]["model"]}

    rows = {"teal": ppl(sparse)}
    started = time.perf_counter()
    with torch.no_grad():
        batches = windows[16:].split(4)
        dense_stream, sparse_stream = first_layer_inputs(dense, batches), first_layer_inputs(sparse, batches)
        for dense_layer, sparse_layer in zip(dense.model.layers, sparse.model.layers):
            for group in GROUPS:
                refit_group(dense_layer, sparse_layer, group, dense_stream, sparse_stream, args)
            dense_stream, sparse_stream = run_layer(dense_layer, dense_stream), run_layer(sparse_layer, sparse_stream)
    rows["refit"] = ppl(sparse)
    for name, row in rows.items():
        print(f"{name:<8} ppl {row['ppl']:8.3f}  sparsity.model {row['sparsity']:.3f}")
    print(json.dumps({**vars(args), "fit_s": time.perf_counter() - started, "rows": rows}))


if __name__ == "__main__":
    main()
