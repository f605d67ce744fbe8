"""The whole GPU matrix in one device call: kernel checks, kernel timings, end-to-end decode.

    PYTHONPATH=src python3 benchmarks/gpu_matrix.py --out $OUT [--budget-s 540] [--sections env,check,...] [--hf]

Sections, in order of importance (each is skipped, and says so, once the time budget is spent):
  env      versions, device, a device-to-device copy (the bandwidth ceiling)
  check    every kernel variant and launch config against a float64 reference on fresh random
           inputs, outputs poisoned with NaN first
  lowrank  (only when named) the GEMV with R-Sparse's low-rank term, every batch-1 candidate on
           the Llama-3-8B shapes at R-Sparse 50%'s ranks, bf16, against float64, a line a shape
  attention the decode attention kernel: every launch config against a float64 reference (bf16,
           fp16; Llama-3-8B heads; short and long caches; in a CUDA graph), timed against
           transformers' SDPA path (repeat_kv copies, then SDPA)
  model    a small model through the triton backend against the torch reference (fp32 logits,
           bf16 module by module), and the compiled + CUDA-graph engine against the eager one
  bars     Llama-3-8B MLP shapes (4096x14336, 14336x4096), bf16, batch 1, 0..90%: kernel vs cuBLAS
  e2e      Llama-3-8B shape, bf16, batch 1: (with --hf) transformers' static-cache compiled
           generate, the engine dense, the engine sparse (TEAL thresholds on its own activations) at every level
  e2e-nopdl (only when named) the same at 50% and 40% with programmatic dependent launch off, for
           the engine's Inductor kernels and actsparse's alike
  e2e-bars (only when named) e2e at the bars' levels only, 50% and 40% (a second measurement)
  e2e-nocombo (only when named) e2e-bars without Inductor's combo kernels (the engine's default on
           CUDA: independent small kernels of the step launched as one), dense and sparse alike
  e2e-alone (only when named) the same at 50% and 40% with every launch config the fastest timed
           alone, not re-chosen inside the decode step
  e2e-sdpa (only when named) the same at 50% and 40% with the model's own (SDPA) attention in
           the decode steps instead of actsparse's decode attention kernel
  topk     the top-K selection kernel (`topk_kept`): every launch config against the torch
           reference (exact), then top-K GEMVs of the bar shapes, bf16, batch 1, timed against
           cuBLAS and against the same GEMV after torch's `topk` mask
  e2e-topk (only when named) e2e with top-K selection on every linear, 50% and 40%
  matrix   the rest: fp16, batch 2/4/8 (union of masks), fused q/k/v and gate+up, o_proj, the
           output-sparse CATS up, the R-Sparse low-rank term
  e2e-more batch 4 end to end, as time allows
  batches  (only when named) the decode shapes at batch 2/4/8, bf16: cuBLAS against the tuner's
           pick, and the fastest CUDA-core and tensor-core (tl.dot) batch tiles timed alone
  e2e-batch (only when named) batch 2 and 4 end to end at 50% and 90% with the kernels taking
           the whole batch (the union of its masks), launch configs timed alone
  e2e-routed (only when named) the same through the "triton" backend, where each module runs
           its kernel on a batch only if it measured it faster than the dense products
  profile  (only when named) GPU time per decode step by kernel, dense and at 50%
Results go to OUT/gpu_matrix.json (rewritten after every section) and a log; a short table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from actsparse.engine import DecodeEngine
from actsparse.kernels import attention_ops, batching, tuning
from actsparse.kernels import ops as op_defs
from actsparse.kernels import triton_ops as ops
from actsparse.speed import (
    environment, hf_generate_speed, measured_sparsity, random_calibration, random_model, read_bytes, speed_result,
    step_profile, timed_decode,
)
from actsparse.calibrate import topk_count
from actsparse.config import make_config
from actsparse.methods import sparsify_
from actsparse.nn import packing
from actsparse.runtime import use_kernels
from actsparse.swap import swap_modules

SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.65, 0.9)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
L2_BYTES = 60e6


class Run:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget_s, self.start = out, budget_s, time.perf_counter()
        self.results: dict = {"sections": {}, "skipped": [], "errors": {}}
        self.log = open(out / "gpu_matrix.log", "w")

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def say(self, msg: str) -> None:
        line = f"[{self.elapsed():6.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def section(self, name: str, fn, need_s: float) -> None:
        if self.elapsed() + need_s > self.budget_s:
            self.say(f"skip {name}: {self.budget_s - self.elapsed():.0f}s left, needs ~{need_s:.0f}s")
            self.results["skipped"].append(name)
            return
        self.say(f"== {name}")
        try:
            self.results["sections"][name] = fn(self)
        except Exception:
            self.results["errors"][name] = traceback.format_exc()
            self.say(f"{name} FAILED:\n{traceback.format_exc()}")
        self.results["tuned"] = {repr(k): repr(v) for k, v in tuning.tuned().items()}
        (self.out / "gpu_matrix.json").write_text(json.dumps(self.results, indent=1, default=str))


def graph_time(calls: list, reps: int = 20, replays: int = 7) -> float:
    """Seconds per call: `reps` calls (rotating over `calls`) in one CUDA graph, median replay."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def emit(out: str, name: str, result: dict) -> None:
    """Writes OUT/NAME.json and prints the result as the last line (one JSON line)."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def copies_for(nbytes: int) -> int:
    return max(2, min(16, math.ceil(4 * L2_BYTES / nbytes)))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def ref_gemv(x, wt, t, scale=None, bias=None, lrb=None, lrz=None):
    score = x.abs().float() * (scale if scale is not None else 1.0)
    y = torch.where(score > t, x, torch.zeros((), dtype=x.dtype, device=x.device)).double() @ wt.double()
    if bias is not None:
        y += bias.double()
    if lrb is not None:
        y += lrz.double() @ lrb.double().T
    return y


# -- sections -----------------------------------------------------------------------------------
def section_env(run: Run) -> dict:
    env = environment(torch.device("cuda"))
    env["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    src = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = graph_time([lambda: dst.copy_(src)], reps=5)
    env["copy_tb_s"] = 2 * src.numel() * 2 / t / 1e12
    run.say(f"{env['device_name']} · torch {env['torch']} · triton {env['triton']} · transformers {env['transformers']} · copy {env['copy_tb_s']:.2f} TB/s")
    return env


def section_check(run: Run) -> dict:
    torch.manual_seed(0)
    dev = "cuda"
    worst: dict[str, float] = {}
    failures = []
    refused: set[str] = set()  # spread configs whose grid the device cannot hold at once

    def record(name: str, err: float, dtype: torch.dtype) -> None:
        worst[name] = max(worst.get(name, 0.0), err)
        if not err <= TOLERANCE[dtype]:
            failures.append(f"{name}: {err:.2e}")

    # Every launch config the tuner may pick, on the main dtype; one config for the other
    # dtypes and the optional inputs (each variant is a separate compile).
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for batch in ((1, 3, 8) if dtype == torch.bfloat16 else (1, 3)):
            for k, n in ((1000, 333), (4096, 14336)):
                x = torch.randn(batch, k, device=dev).to(dtype)
                wt = (torch.randn(k, n, device=dev) / math.sqrt(k)).to(dtype)
                scale = torch.rand(k, device=dev) + 0.5
                bias = torch.randn(n, device=dev).to(dtype)
                lrb = torch.randn(n, 24, device=dev).to(dtype)
                lrz = torch.randn(batch, 24, device=dev).to(dtype)
                candidates = ops.gemv_candidates(n, k, batch, x.device)
                for s in (0.0, 0.5, 0.95):
                    t = torch.tensor(-1.0 if s == 0 else float(x.abs().float().quantile(s)), device=dev)
                    for cfg in candidates if dtype == torch.bfloat16 else candidates[:1]:
                        y = torch.full((batch, n), float("nan"), dtype=dtype, device=dev)
                        try:
                            ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
                        except tuning.Unlaunchable as e:
                            refused.add(f"{k}x{n} {cfg}: {e}")
                            continue
                        record(f"gemv {dtype} b{batch}", rel_err(y, ref_gemv(x, wt, t)), dtype)
                    y = torch.full((batch, n), float("nan"), dtype=dtype, device=dev)
                    ops.launch_input_sparse(x, wt, t, scale, bias, lrb, lrz, candidates[0], y)
                    record(f"gemv+scale+bias+lowrank {dtype} b{batch}", rel_err(y, ref_gemv(x, wt, t, scale, bias, lrb, lrz)), dtype)
            for j, d in ((333, 1000), (14336, 4096)):
                x = torch.randn(batch, d, device=dev).to(dtype)
                a = torch.randn(batch, j, device=dev).to(dtype)
                w = (torch.randn(j, d, device=dev) / math.sqrt(d)).to(dtype)
                candidates = ops.rows_candidates(batch, x.device)
                for s in (0.0, 0.5, 0.95):
                    t = torch.tensor(-1.0 if s == 0 else float(a.abs().float().quantile(s)), device=dev)
                    u = (x.double() @ w.double().T).to(dtype)
                    ref = torch.where(a.abs().float() > t, a, torch.zeros((), dtype=dtype, device=dev)).double() * u.double()
                    for cfg in candidates if dtype == torch.bfloat16 else candidates[:1]:
                        m = torch.full((batch, j), float("nan"), dtype=dtype, device=dev)
                        ops.launch_output_sparse_rows(x, a, t, w, cfg, m)
                        record(f"rows {dtype} b{batch}", rel_err(m, ref), dtype)
    # The gated gate+up call (act(gate) * up in the epilogue), every candidate, batch 1.
    for dtype in (torch.bfloat16, torch.float16):
        for k, j in ((1000, 512), (4096, 14336)):
            group = packing.gate_up_group(j)
            x = torch.randn(1, k, device=dev).to(dtype)
            gate_t, up_t = ((torch.randn(k, j, device=dev) / math.sqrt(k)).to(dtype) for _ in range(2))
            packed = packing.interleave_gate_up(gate_t, up_t, group)
            for s in (0.0, 0.5, 0.95):
                t = torch.tensor(-1.0 if s == 0 else float(x.abs().float().quantile(s)), device=dev)
                g, u = packing.split_gate_up(ref_gemv(x, packed, t).to(dtype), group)
                for act, fn in (("silu", F.silu), ("gelu_tanh", lambda v: F.gelu(v, approximate="tanh"))):
                    ref = (fn(g.float()).to(dtype) * u).double()
                    for cfg in ops.gated_candidates(2 * j, k, x.device, group)[:: 1 if dtype == torch.bfloat16 else 8]:
                        m = torch.full((1, j), float("nan"), dtype=dtype, device=dev)
                        try:
                            ops.launch_input_sparse(x, packed, t, None, None, None, None, cfg, m, act, group)
                        except tuning.Unlaunchable as e:
                            refused.add(f"gated {k}x{j} {cfg}: {e}")
                            continue
                        record(f"gated {act} {dtype}", rel_err(m, ref), dtype)
    # The spread split-K sums (a spin-wait across programs): every spread candidate of the decode
    # shapes, with the optional inputs once, then many launches on fresh inputs, element by element.
    bf16 = torch.bfloat16
    for k, n in ((4096, 6144), (4096, 4096), (14336, 4096), (4096, 28672)):
        wt = (torch.randn(k, n, device=dev) / math.sqrt(k)).to(bf16)
        spread = []
        for cfg in (c for c in ops.gemv_candidates(n, k, 1, wt.device) if c.spread):
            try:
                ops.launch_input_sparse(torch.zeros(1, k, device=dev, dtype=bf16), wt, torch.zeros((), device=dev), None, None,
                                        None, None, cfg, torch.empty(1, n, device=dev, dtype=bf16))
                spread.append(cfg)
            except tuning.Unlaunchable as e:
                refused.add(f"{k}x{n} {cfg}: {e}")
        scale, bias = torch.rand(k, device=dev) + 0.5, torch.randn(n, device=dev).to(bf16)
        lrb, lrz = torch.randn(n, 24, device=dev).to(bf16), torch.randn(1, 24, device=dev).to(bf16)
        for i, cfg in enumerate(spread):
            if i == 0:  # a cooperative launch captured in a CUDA graph, as the decode engine runs it
                x = torch.randn(1, k, device=dev).to(bf16)
                t = torch.tensor(float(x.abs().float().quantile(0.5)), device=dev)
                y = torch.full((1, n), float("nan"), dtype=bf16, device=dev)
                ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    ops.launch_input_sparse(x, wt, t, None, None, None, None, cfg, y)
                y.fill_(float("nan"))
                graph.replay()
                record(f"spread in a graph {k}x{n}", rel_err(y, ref_gemv(x, wt, t)), bf16)
            for rep in range(10):
                x = torch.randn(1, k, device=dev).to(bf16)
                t = torch.tensor(float(x.abs().float().quantile(0.5)), device=dev)
                full = i == 0 and rep == 0
                args = (scale, bias, lrb, lrz) if full else (None, None, None, None)
                y = torch.full((1, n), float("nan"), dtype=bf16, device=dev)
                ops.launch_input_sparse(x, wt, t, *args, cfg, y)
                ref = ref_gemv(x, wt, t, *args)
                record(f"spread {'+scale+bias+lowrank ' if full else ''}{k}x{n}", rel_err(y, ref), bf16)
                off = ((y.double() - ref).abs() > 0.02 * ref.abs().max()).sum().item()
                if off:
                    failures.append(f"spread {cfg} {k}x{n} launch {rep}: {off} outputs off")
    run.say("kernel checks: " + ("all within tolerance" if not failures else f"{len(failures)} FAILURES")
            + f"; {len(refused)} spread configs refused (grid too large to be resident)")
    for f in failures[:20]:
        run.say("  " + f)
    return {"worst_rel_err": worst, "failures": failures, "refused": sorted(refused)}


def section_lowrank(run: Run) -> dict:
    """The GEMV with R-Sparse's low-rank term (each split-K program adds its share of the ranks):
    every batch-1 candidate on the Llama-3-8B shapes at R-Sparse 50%'s default ranks, bf16, 50%
    threshold, against float64, one line a shape as it goes (the check section reports only at its
    end, after compiling every variant it checks)."""
    torch.manual_seed(0)
    dev, bf16 = "cuda", torch.bfloat16
    worst, failures, refused = {}, [], []
    for k, n, rank in ((4096, 4096, 102), (4096, 1024, 40), (4096, 14336, 159), (14336, 4096, 159)):
        started = time.perf_counter()
        x = torch.randn(1, k, device=dev).to(bf16)
        wt = (torch.randn(k, n, device=dev) / math.sqrt(k)).to(bf16)
        lrb, lrz = (torch.randn(n, rank, device=dev) / 10).to(bf16), torch.randn(1, rank, device=dev).to(bf16)
        t = torch.tensor(float(x.abs().float().quantile(0.5)), device=dev)
        ref = ref_gemv(x, wt, t, lrb=lrb, lrz=lrz)
        name = f"{k}x{n} rank {rank}"
        candidates = ops.gemv_candidates(n, k, 1, x.device)
        for cfg in candidates:
            y = torch.full((1, n), float("nan"), dtype=bf16, device=dev)
            try:
                ops.launch_input_sparse(x, wt, t, None, None, lrb, lrz, cfg, y)
            except tuning.Unlaunchable as e:
                refused.append(f"{name} {cfg}: {e}")
                continue
            err = rel_err(y, ref)
            worst[name] = max(worst.get(name, 0.0), err)
            if not err <= TOLERANCE[bf16]:
                failures.append(f"{name} {cfg}: {err:.2e}")
        run.say(f"low-rank GEMV {name}: {len(candidates)} candidates, worst {worst.get(name, float('nan')):.1e}, "
                f"{time.perf_counter() - started:.0f} s")
    run.say("low-rank checks: " + ("all within tolerance" if not failures else f"{len(failures)} FAILURES"))
    for f in failures[:20]:
        run.say("  " + f)
    return {"worst_rel_err": worst, "failures": failures, "refused": refused}


def _attention_reference(q, k, v, keep, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).matmul(v).transpose(1, 2)


def section_attention(run: Run) -> dict:
    """The decode attention kernel: correctness of every config, then its time against
    transformers' SDPA path for a decode step (Llama-3-8B: 32 query heads, 8 KV heads, 128)."""
    from transformers.integrations.sdpa_attention import repeat_kv

    torch.manual_seed(0)
    failures, worst, timings = [], {}, []
    for dtype in (torch.bfloat16, torch.float16):
        for batch, q_len, kv_len, filled in ((1, 1, 160, 40), (1, 1, 160, 159), (2, 1, 1024, 700), (1, 4, 4096, 3000)):
            q = torch.randn(batch, 32, q_len, 128, device="cuda").to(dtype)
            k, v = (torch.randn(batch, 8, kv_len, 128, device="cuda").to(dtype) for _ in range(2))
            keep = (torch.arange(kv_len, device="cuda")[None, None, None, :]
                    < filled + torch.arange(q_len, device="cuda")[None, None, :, None] + 1).expand(batch, 1, q_len, kv_len)
            ref = _attention_reference(q, k, v, keep, 128 ** -0.5)
            name = f"{str(dtype)[6:]} b{batch} q{q_len} L{kv_len}"
            for cfg in attention_ops.attention_candidates(kv_len, q.device):
                out = torch.full((batch, q_len, 32, 128), float("nan"), dtype=dtype, device="cuda")
                attention_ops.launch_decode_attention(q, k, v, keep, 128 ** -0.5, 0.0, cfg, out)
                err = rel_err(out, ref)
                worst[name] = max(worst.get(name, 0.0), err)
                if not err <= TOLERANCE[dtype]:
                    failures.append(f"{name} {cfg}: {err:.2e}")
            out = torch.full((batch, q_len, 32, 128), float("nan"), dtype=dtype, device="cuda")
            graph = torch.cuda.CUDAGraph()
            attention_ops.decode_attention(q, k, v, keep, 128 ** -0.5, 0.0)  # tunes outside the capture
            with torch.cuda.graph(graph):
                out.copy_(attention_ops.decode_attention(q, k, v, keep, 128 ** -0.5, 0.0))
            out.fill_(float("nan"))
            graph.replay()
            if not rel_err(out, ref) <= TOLERANCE[dtype]:
                failures.append(f"{name} in a graph: {rel_err(out, ref):.2e}")
            if dtype == torch.bfloat16:
                kernel_s = graph_time([lambda: attention_ops.decode_attention(q, k, v, keep, 128 ** -0.5, 0.0)])
                sdpa_s = graph_time([lambda: F.scaled_dot_product_attention(
                    q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=keep, scale=128 ** -0.5)])
                timings.append({"case": name, "kernel_us": kernel_s * 1e6, "sdpa_repeat_kv_us": sdpa_s * 1e6})
                run.say(f"attention {name}: kernel {kernel_s * 1e6:.1f} us, repeat_kv + SDPA {sdpa_s * 1e6:.1f} us")
    run.say("attention checks: " + ("all within tolerance" if not failures else f"{len(failures)} FAILURES"))
    for f in failures[:20]:
        run.say("  " + f)
    tuned = {str(key): str(cfg) for key, cfg in tuning.tuned().items() if key[0] == "attention"}
    return {"worst_rel_err": worst, "failures": failures, "timings": timings, "tuned": tuned}


def check_model(run: Run, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    """A small Llama through the triton backend against the torch reference (TEAL thresholds, CATS,
    top-K on every linear): whole logits in
    fp32 (bf16 random models amplify rounding through every threshold), every module on its own
    input in bf16, and the compiled + CUDA-graph engine against the eager one."""
    import transformers

    from actsparse.nn import SparseGatedMLP, SparseLinear

    config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                      num_attention_heads=8, num_key_value_heads=2, vocab_size=4096)
    out = {}
    for method in ("teal", "cats", "topk"):
        for dtype in dtypes:
            torch.manual_seed(0)
            with torch.device("cuda"):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
            ids = torch.randint(0, 4096, (2, 4), device="cuda")  # 8 tokens: the kernels' largest batch
            config = make_config("teal", sparsity=0.5, selection="topk") if method == "topk" else make_config(method, sparsity=0.5)
            sparsify_(model, config, torch.randint(0, 4096, (2, 64)))
            with torch.inference_mode():
                ref = model(input_ids=ids).logits.double()
                use_kernels(model)
                module_errs = []

                def hook(module, args, output):
                    expect = module.reference(args[0])
                    module_errs.append(rel_err(output, expect.double()))

                handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (SparseLinear, SparseGatedMLP))]
                with batching.always_kernels():  # the 8-token batch through the kernels
                    got = model(input_ids=ids).logits
                for h in handles:
                    h.remove()
            key = f"{method} {str(dtype)[6:]}"
            out[key] = {"logits_rel_err": rel_err(got, ref), "worst_module_rel_err": max(module_errs)}
            if dtype == torch.float32:
                use_kernels(model)  # batches measured afresh
                eager = DecodeEngine(model, max_len=48, compile=False, cuda_graph=False)
                graphed = DecodeEngine(model, max_len=48)
                a, b = eager.generate(ids[:1], 24).tokens, graphed.generate(ids[:1], 24).tokens
                out[key]["engine_token_agreement"] = (a == b).float().mean().item()
                # two prompts: each module runs its kernel or the reference, as it measured
                eager = DecodeEngine(model, max_len=48, batch_size=2, compile=False, cuda_graph=False)
                graphed = DecodeEngine(model, max_len=48, batch_size=2)
                a, b = eager.generate(ids, 24).tokens, graphed.generate(ids, 24).tokens
                out[key]["engine_token_agreement_batch2"] = (a == b).float().mean().item()
                out[key]["batch2_choices"] = batch_choices(model, 2)
                del eager, graphed
            run.say(f"model {key}: {json.dumps(out[key])}")
            del model
            torch._dynamo.reset()
    return out


def time_gemv(k: int, n: int, dtype: torch.dtype, batch: int, sparsities, what: str) -> list[dict]:
    """cuBLAS dense F.linear against the input-sparse kernel, rotating weight copies past L2."""
    rows = []
    nbytes = k * n * torch.finfo(dtype).bits // 8
    copies = copies_for(nbytes)
    ws = [(torch.randn(n, k, device="cuda") / math.sqrt(k)).to(dtype) for _ in range(copies)]
    wts = [w.T.contiguous() for w in ws]
    x = torch.randn(batch, k, device="cuda").to(dtype)
    dense = graph_time([lambda w=w: F.linear(x, w) for w in ws])
    for s in sparsities:
        t = torch.tensor(-1.0 if s == 0 else float(x.abs().float().quantile(s)), device="cuda")
        union = (x.abs().float() > t).any(0).float().mean().item()
        err = rel_err(ops.input_sparse_linear(x, wts[0], t, None, None, None, None, s), ref_gemv(x, wts[0], t))
        sparse = graph_time([lambda wt=wt: ops.input_sparse_linear(x, wt, t, None, None, None, None, s) for wt in wts])
        rows.append({"kernel": what, "k": k, "n": n, "dtype": str(dtype)[6:], "batch": batch, "sparsity": s,
                     "union_kept": union, "dense_us": dense * 1e6, "sparse_us": sparse * 1e6,
                     "speedup": dense / sparse, "ideal": 1 / max(union, 1e-9),
                     "dense_tb_s": nbytes / dense / 1e12, "sparse_tb_s": nbytes * union / sparse / 1e12, "rel_err": err})
    del ws, wts
    return rows


def time_batches(k: int, n: int, what: str, batch: int, sparsities) -> list[dict]:
    """`time_gemv` at one batch, with the tuner's choice and its fastest CUDA-core and tl.dot
    candidates (each timed alone by the tuner, L2 evicted)."""
    rows = time_gemv(k, n, torch.bfloat16, batch, sparsities, what)
    for row in rows:
        key = next(key for key in tuning.timings() if key[:4] == ("gemv", n, k, batch)
                   and key[-1] == tuning.sparsity_bin(row["sparsity"]))
        timed = tuning.timings()[key]
        for label, dot in (("cuda_core", False), ("dot", True)):
            cfg, sec = min(((c, t) for c, t in timed if c.dot == dot), key=lambda ct: ct[1])
            row[f"best_{label}_us"], row[f"best_{label}_config"] = sec * 1e6, str(cfg)
        row["chosen"] = str(tuning.tuned()[key])
    return rows


def section_batches(run: Run) -> dict:
    plan = [(4096, 28672, "gate+up fused"), (14336, 4096, "down 14336x4096"), (4096, 6144, "qkv fused"), (4096, 4096, "o 4096x4096")]
    rows = []
    for batch in (4, 2, 8):
        for k, n, what in plan:
            if run.elapsed() > run.budget_s - 40:
                run.say("batches: stop, out of time")
                return {"rows": rows}
            new = time_batches(k, n, what, batch, (0.0, 0.5, 0.65, 0.9))
            rows += new
            run.say(f"{what:<16} b{batch}: " + " ".join(
                f"{r['sparsity']:.2f}:x{r['speedup']:.2f}(kept {r['union_kept']:.2f}; cuda-core {r['best_cuda_core_us']:.1f} "
                f"dot {r['best_dot_us']:.1f} cuBLAS {r['dense_us']:.1f} us)" for r in new))
    return {"rows": rows}


def time_floor(k: int, n: int, dtype: torch.dtype) -> dict:
    """The fixed cost of one launch: the kernel tuned for 50% with nothing kept (no weight row
    is read), and an empty Triton kernel, both in the same graph timing."""
    wts = [torch.zeros(k, n, device="cuda", dtype=dtype) for _ in range(2)]
    x = torch.randn(1, k, device="cuda").to(dtype)
    half = torch.tensor(float(x.abs().float().quantile(0.5)), device="cuda")
    none = torch.tensor(float("inf"), device="cuda")
    ops.input_sparse_linear(x, wts[0], half, None, None, None, None, 0.5)  # tunes at 50%
    y = torch.empty(1, device="cuda")
    return {"k": k, "n": n,
            "nothing_kept_us": graph_time([lambda wt=wt: ops.input_sparse_linear(x, wt, none, None, None, None, None, 0.5) for wt in wts]) * 1e6,
            "empty_kernel_us": graph_time([lambda: _empty_kernel[(1,)](y)]) * 1e6}


@triton.jit
def _empty_kernel(y_ptr):
    pass


def time_gated(k: int, j: int, dtype: torch.dtype, sparsities) -> list[dict]:
    """The gate+up call with act(gate) * up in its epilogue against the same GEMV followed by
    torch's silu and product, and against cuBLAS on the fused [2J, K] weight alone."""
    rows = []
    nbytes = 2 * k * j * torch.finfo(dtype).bits // 8
    group = packing.gate_up_group(j)
    ws = [(torch.randn(2 * j, k, device="cuda") / math.sqrt(k)).to(dtype) for _ in range(copies_for(nbytes))]
    packs = [packing.interleave_gate_up(w[:j].T, w[j:].T, group).contiguous() for w in ws]
    x = torch.randn(1, k, device="cuda").to(dtype)
    dense = graph_time([lambda w=w: F.linear(x, w) for w in ws])
    for s in sparsities:
        t = torch.tensor(-1.0 if s == 0 else float(x.abs().float().quantile(s)), device="cuda")

        def unfused(p):
            g, u = packing.split_gate_up(ops.input_sparse_linear(x, p, t, None, None, None, None, s), group)
            return F.silu(g) * u

        gated = graph_time([lambda p=p: ops.input_sparse_gated(x, p, t, None, None, None, None, group, "silu", s) for p in packs])
        apart = graph_time([lambda p=p: unfused(p) for p in packs])
        rows.append({"k": k, "j": j, "sparsity": s, "cublas_gemv_us": dense * 1e6, "gated_us": gated * 1e6, "unfused_us": apart * 1e6})
    del ws, packs
    return rows


def section_topk(run: Run) -> dict:
    """`topk_kept` against the torch reference (exact: the same scores, the same ties kept), every
    launch config in bf16 and some in fp16 and fp32 (each dtype a kernel variant), then top-K GEMVs of the bar shapes, bf16, batch 1: the kernel path (selection
    kernel, then the GEMV skipping the zeros) against cuBLAS, against torch's top-K mask before
    the same GEMV, and against the threshold GEMV at the same sparsity."""
    dev = "cuda"
    torch.manual_seed(0)
    failures, launches, stopped = [], 0, None
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (1000, 4096, 14336):
            for batch in (1, 3, 8):
                for ties in (False, True):
                    if stopped is None and run.elapsed() > run.budget_s - 60:  # leave ~60 s for the GEMV timings after the checks
                        stopped = f"{str(dtype)[6:]} d={d} b={batch} ties={ties}"
                        run.say(f"topk_kept checks: stop before {stopped}, out of time")
                    if stopped is not None:
                        continue
                    x = torch.randn(batch, d, device=dev)
                    x = ((x * 2).round() / 2 if ties else x).to(dtype)
                    for scale in (None, torch.rand(d, device=dev) + 0.5):
                        for k in (1, d // 10, d // 2, d):
                            ref = op_defs.topk_kept_reference(x, k, scale)
                            candidates = ops.topk_candidates(d, x.device)
                            for cfg in candidates if dtype == torch.bfloat16 else candidates[::4]:
                                out = torch.full_like(x, float("nan"))
                                ops.launch_topk_kept(x, k, scale, cfg, out)
                                launches += 1
                                if not torch.equal(out, ref):
                                    failures.append(f"{str(dtype)[6:]} d={d} b={batch} ties={ties} scale={scale is not None} "
                                                    f"k={k} {cfg}: {(out != ref).sum().item()} entries differ")
    run.say(f"topk_kept checks: {launches} launches, " + ("all equal to the reference" if not failures else f"{len(failures)} FAILURES"))
    for f in failures[:20]:
        run.say("  " + f)
    rows = []
    dtype = torch.bfloat16
    for k, n, what in ((4096, 14336, "up 4096x14336"), (14336, 4096, "down 14336x4096")):
        nbytes = k * n * 2
        wts = [(torch.randn(k, n, device=dev) / math.sqrt(k)).to(dtype) for _ in range(copies_for(nbytes))]
        ws = [wt.T.contiguous() for wt in wts]
        x = torch.randn(1, k, device=dev).to(dtype)
        zero = torch.zeros((), device=dev)
        dense = graph_time([lambda w=w: F.linear(x, w) for w in ws])
        for s in (0.25, 0.5, 0.65, 0.9):
            kk = topk_count(k, s)
            t = torch.tensor(float(x.abs().float().quantile(s)), device=dev)

            def by_kernel(wt):
                return ops.input_sparse_linear(ops.topk_kept(x, kk, None), wt, zero, None, None, None, None, s)

            def by_torch(wt):
                return ops.input_sparse_linear(op_defs.topk_kept_reference(x, kk, None), wt, zero, None, None, None, None, s)

            kept_ref = op_defs.topk_kept_reference(x, kk, None)
            row = {"kernel": what, "k": k, "n": n, "sparsity": s, "kept": kk, "dense_us": dense * 1e6,
                   "select_us": graph_time([lambda: ops.topk_kept(x, kk, None)]) * 1e6,
                   "topk_us": graph_time([lambda wt=wt: by_kernel(wt) for wt in wts]) * 1e6,
                   "torch_topk_us": graph_time([lambda wt=wt: by_torch(wt) for wt in wts]) * 1e6,
                   "threshold_us": graph_time([lambda wt=wt: ops.input_sparse_linear(x, wt, t, None, None, None, None, s)
                                               for wt in wts]) * 1e6,
                   "rel_err": rel_err(by_kernel(wts[0]), ref_gemv(kept_ref, wts[0], zero))}
            row.update(speedup=row["dense_us"] / row["topk_us"], torch_speedup=row["dense_us"] / row["torch_topk_us"])
            rows.append(row)
            run.say(f"top-K {what} s={s:.2f}: cuBLAS {row['dense_us']:.1f} us, selection {row['select_us']:.1f}, "
                    f"selection + GEMV {row['topk_us']:.1f} (x{row['speedup']:.2f}), torch topk + GEMV {row['torch_topk_us']:.1f} "
                    f"(x{row['torch_speedup']:.2f}), threshold GEMV {row['threshold_us']:.1f}, rel err {row['rel_err']:.1e}")
        del wts, ws
    candidates = {}  # each selection's launch configs as the tuner timed them alone
    for key, times in tuning.timings().items():
        if key[0] == "topk":
            candidates[str(key)] = {str(cfg): us * 1e6 for cfg, us in times}
    return {"checks": {"launches": launches, "failures": failures, "stopped_before": stopped}, "rows": rows,
            "candidates": candidates}


def section_bars(run: Run) -> dict:
    rows = []
    for k, n, what in ((4096, 14336, "up 4096x14336"), (14336, 4096, "down 14336x4096")):
        rows += time_gemv(k, n, torch.bfloat16, 1, SPARSITIES, what)
    for r in rows:
        run.say(f"{r['kernel']:<18} s={r['sparsity']:.2f} cuBLAS {r['dense_us']:6.1f}us ({r['dense_tb_s']:.2f} TB/s) "
                f"sparse {r['sparse_us']:6.1f}us ({r['sparse_tb_s']:.2f} TB/s) x{r['speedup']:.2f} (ideal x{r['ideal']:.2f})")
    floors = [time_floor(k, n, torch.bfloat16) for k, n in ((4096, 14336), (14336, 4096), (4096, 4096), (4096, 6144))]
    for f in floors:
        run.say(f"floor {f['k']}x{f['n']}: nothing kept {f['nothing_kept_us']:.1f} us, empty kernel {f['empty_kernel_us']:.1f} us")
    gated = time_gated(4096, 14336, torch.bfloat16, (0.0, 0.5, 0.9))
    for g in gated:
        run.say(f"gate+up 4096x2x14336 s={g['sparsity']:.2f}: cuBLAS GEMV {g['cublas_gemv_us']:.1f} us, "
                f"gated {g['gated_us']:.1f} us, GEMV + silu*up {g['unfused_us']:.1f} us")
    return {"rows": rows, "floors": floors, "gated": gated}


def e2e(run: Run, shape: str, dtype: torch.dtype, batch: int, sparsities, hf: bool, tokens: int = 128,
        dependent_launch: bool = True, decode_attention: bool = True, tune_in_step: bool = True,
        inductor_options: dict | None = None, backend: str = "triton", selection: str = "threshold") -> dict:
    """`dependent_launch` False: the engine's Inductor kernels and actsparse's kernels both launch
    without programmatic dependent launch (to measure what it brings, dense and sparse alike).
    `decode_attention` False: the decode steps run the model's SDPA attention instead of
    actsparse's decode attention kernel. `tune_in_step` False: the kernels' launch configs are
    the fastest timed alone, not re-chosen inside the decode step (`DecodeEngine.tune`).
    `inductor_options`: passed to the engine's compile, dense and sparse alike (None: the
    engine's default). `backend`: how the sparse model's batches run ("triton": a batch runs
    a module's kernel where it measured faster than dense; "triton-batch8": always,
    `batching.always_kernels`).
    `selection` "topk": every linear keeps its top-K inputs per token instead of TEAL thresholds.
    Every level is a fresh model of the same weights sparsified by `sparsify_` (TEAL's own
    calibration on random tokens), decoded in its own engine."""
    prompt_len = 32
    tuning.clear()  # every run tunes its own kernels
    model = random_model(shape, dtype, "cuda", seed=0)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    out: dict = {"shape": shape, "dtype": str(dtype)[6:], "batch": batch, "tokens": tokens, "levels": [],
                 "dependent_launch": dependent_launch, "decode_attention": decode_attention,
                 "tune_in_step": tune_in_step, "inductor_options": inductor_options, "backend": backend,
                 "selection": selection}
    ops.set_dependent_launch(dependent_launch)
    if hf:
        t0 = time.perf_counter()
        out["hf_tok_s"] = hf_generate_speed(model, prompts, tokens)
        run.say(f"transformers generate, static cache, compiled: {out['hf_tok_s']:.1f} tok/s ({time.perf_counter() - t0:.0f}s incl. compile)")
        torch._dynamo.reset()
    swap_modules(model)
    engine = DecodeEngine(model, max_len=prompt_len + tokens, batch_size=batch, dependent_launch=dependent_launch,
                          decode_attention=decode_attention, inductor_options=inductor_options)
    t0 = time.perf_counter()
    dense = timed_decode(engine, prompts, tokens, repeats=2, tune=tune_in_step)
    out["dense_tok_s"] = dense.tokens_per_s
    out["dense_tuning_in_step"] = engine.tuning_report
    out["dense_warm_s"] = time.perf_counter() - t0
    linear_bytes, other_bytes = read_bytes(model)
    run.say(f"engine dense: {dense.tokens_per_s:.1f} tok/s ({out['dense_warm_s']:.0f}s incl. compile)")
    del engine, model
    torch.cuda.empty_cache()
    for s in sparsities:
        if run.elapsed() > run.budget_s - 25:
            run.say(f"  stop before s={s}: out of time")
            break
        t0 = time.perf_counter()
        model = random_model(shape, dtype, "cuda", seed=0)
        sparsify_(model, make_config("teal", sparsity=s, selection=selection), random_calibration(model))
        sparsify_s = time.perf_counter() - t0
        use_kernels(model)
        engine = DecodeEngine(model, max_len=prompt_len + tokens, batch_size=batch, dependent_launch=dependent_launch,
                              decode_attention=decode_attention, inductor_options=inductor_options)
        with batching.always_kernels() if backend == "triton-batch8" else contextlib.nullcontext():
            sparse = timed_decode(engine, prompts, tokens, repeats=2, tune=tune_in_step)
        measured = measured_sparsity(model, torch.cat([prompts, sparse.tokens], 1))
        row = speed_result(dense, sparse, measured, linear_bytes, other_bytes, batch)
        row.update(target=s, sparsify_s=sparsify_s, warm_s=time.perf_counter() - t0,
                   tuning_in_step=engine.tuning_report, batch_choices=batch_choices(model, batch))
        for key, times in engine.tuning_report.items():
            alone, best = next(iter(times)), min(times, key=times.get)
            if best != alone:
                run.say(f"    in the step {key[:40]}: {best} over {alone}, {1e6 * times[best]:.1f} against {1e6 * times[alone]:.1f} us per step")
        out["levels"].append(row)
        run.say(f"  s={s:.2f} (measured {measured:.3f}): {sparse.tokens_per_s:.1f} tok/s x{row['speedup']:.2f} "
                f"(ideal x{row['ideal_speedup']:.2f}, {100 * row['fraction_of_ideal']:.0f}%) {row['sparse_gb_s']:.0f} GB/s"
                + (f"; batch calls measured: {row['batch_choices']}" if row["batch_choices"] else ""))
        del engine, model
        torch.cuda.empty_cache()
    ops.set_dependent_launch(True)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def batch_choices(model: torch.nn.Module, batch: int) -> dict:
    """How many modules measured their kernel faster than the dense products at `batch` tokens
    (the "triton" backend's choice), by module kind, with the summed times."""
    out: dict = {}
    for module in model.modules():
        seconds = getattr(module, "batch_seconds", {}).get(batch)
        if seconds is None:
            continue
        kind = out.setdefault(type(module).__name__, {"kernel": 0, "dense": 0, "kernel_us": 0.0, "dense_us": 0.0})
        kind["kernel" if seconds[0] < seconds[1] else "dense"] += 1
        kind["kernel_us"] += seconds[0] * 1e6
        kind["dense_us"] += seconds[1] * 1e6
    return out


def section_profile(run: Run, steps: int = 8) -> dict:
    """Where a decode step's time goes, dense and at 50%: the Llama-3-8B shape, bf16, batch 1, the
    engine's graph replayed under the profiler; GPU time per step by kernel name, largest first."""
    prompt_len = 32
    out = {}
    for label, sparsity in (("dense", None), ("sparse 0.5", 0.5)):
        model = random_model("llama3-8b", torch.bfloat16, "cuda", seed=0)
        prompts = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
        if sparsity is None:
            swap_modules(model)
        else:
            sparsify_(model, make_config("teal", sparsity=sparsity), random_calibration(model))
            use_kernels(model)
        engine = DecodeEngine(model, max_len=prompt_len + 64)
        engine.generate(prompts, 4)  # compile, tune, capture
        out[label] = step_profile(engine, prompts, steps)
        total = out[label]["gpu_us_per_step"]
        run.say(f"profile {label}: {total:.0f} us of GPU time per step in {out[label]['kernels_per_step']:.0f} kernels")
        for row in out[label]["top"][:12]:
            run.say(f"   {row['us_per_step']:8.1f} us {row['calls_per_step']:6.1f}x  {row['kernel'][:100]}")
        del engine, model
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return out


def section_matrix(run: Run) -> dict:
    """In order of importance, until the time is spent: the other batch-1 bf16 shapes, the union
    of masks at batch 2/4/8, fp16, then CATS / top-K / low-rank."""
    bf16, fp16 = torch.bfloat16, torch.float16
    plan = [(4096, 28672, "gate+up fused", bf16, 1), (4096, 6144, "qkv fused", bf16, 1), (4096, 4096, "o 4096x4096", bf16, 1),
            (4096, 1024, "k/v 4096x1024", bf16, 1)]
    plan += [(k, n, what, bf16, b) for b in (2, 4, 8) for k, n, what in ((4096, 14336, "up 4096x14336"), (14336, 4096, "down 14336x4096"))]
    plan += [(4096, 14336, "up 4096x14336", fp16, 1), (14336, 4096, "down 14336x4096", fp16, 1)]
    rows = []
    for k, n, what, dtype, batch in plan:
        if run.elapsed() > run.budget_s - 45:
            run.say("matrix: stop, out of time")
            break
        new = time_gemv(k, n, dtype, batch, SPARSITIES, what)
        rows += new
        run.say(f"{what:<16} {str(dtype)[6:]} b{batch}: " + " ".join(
            f"{r['sparsity']:.2f}:x{r['speedup']:.2f}(kept {r['union_kept']:.2f})" for r in new))
    result = {"rows": rows}
    if run.elapsed() < run.budget_s - 30:
        result["extra"] = extra_kernels(run)
    return result


def extra_kernels(run: Run) -> dict:
    """CATS output-sparse up (+ the whole gate-driven MLP), R-Sparse low-rank; bf16."""
    out = {"cats_up": [], "cats_mlp": [], "lowrank": []}
    dtype, d, f = torch.bfloat16, 4096, 14336
    wg = (torch.randn(f, d, device="cuda") / 64).to(dtype)
    wu = (torch.randn(f, d, device="cuda") / 64).to(dtype)
    wd = (torch.randn(d, f, device="cuda") / 120).to(dtype)
    wdt = wd.T.contiguous()
    zero = torch.zeros((), device="cuda")
    for batch in (1, 4):
        x = torch.randn(batch, d, device="cuda").to(dtype)
        g = F.linear(x, wg)
        a = F.silu(g)
        dense_up = graph_time([lambda: F.linear(x, wu)])
        dense_mlp = graph_time([lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)])
        for s in SPARSITIES:
            t = torch.tensor(-1.0 if s == 0 else float(a.abs().float().quantile(s)), device="cuda")
            rows_t = graph_time([lambda: ops.output_sparse_rows(x, a, t, wu, s)])

            def mlp():
                aa = F.silu(F.linear(x, wg))
                m = ops.output_sparse_rows(x, aa, t, wu, s)
                return ops.input_sparse_linear(m, wdt, zero, None, None, None, None, s)

            mlp_t = graph_time([mlp])
            out["cats_up"].append({"batch": batch, "sparsity": s, "dense_us": dense_up * 1e6, "sparse_us": rows_t * 1e6, "speedup": dense_up / rows_t})
            out["cats_mlp"].append({"batch": batch, "sparsity": s, "dense_us": dense_mlp * 1e6, "sparse_us": mlp_t * 1e6, "speedup": dense_mlp / mlp_t})
        run.say(f"cats b{batch}: up " + " ".join(f"{r['sparsity']:.2f}:x{r['speedup']:.2f}" for r in out["cats_up"][-6:])
                + " | mlp " + " ".join(f"{r['sparsity']:.2f}:x{r['speedup']:.2f}" for r in out["cats_mlp"][-6:]))
    x = torch.randn(1, d, device="cuda").to(dtype)
    wt = (torch.randn(d, f, device="cuda") / 64).to(dtype)
    w = wt.T.contiguous()
    dense = graph_time([lambda: F.linear(x, w)])
    for s in (0.5, 0.9):
        for rank in (64, 256):
            at = (torch.randn(d, rank, device="cuda") / 64).to(dtype)
            lrb = (torch.randn(f, rank, device="cuda") / 16).to(dtype)
            folded = packing.fold_lowrank(w, at.T, lrb).T.contiguous()  # (W - B A)^T, read over the kept channels
            t = torch.tensor(float(x.abs().float().quantile(s)), device="cuda")

            def lowrank():
                return ops.input_sparse_linear(x, folded, t, None, None, lrb, x @ at, s)

            lr = graph_time([lowrank])
            z, z_ref = x @ at, x.double() @ at.double()
            ref = ref_gemv(x, folded, t, lrb=lrb, lrz=z_ref.to(dtype))
            out["lowrank"].append({"sparsity": s, "rank": rank, "dense_us": dense * 1e6, "sparse_us": lr * 1e6,
                                   "speedup": dense / lr, "rel_err": rel_err(lowrank(), ref), "z_rel_err": rel_err(z, z_ref)})
    run.say("lowrank: " + " ".join(f"{r['sparsity']}/r{r['rank']}:x{r['speedup']:.2f}" for r in out["lowrank"]))
    return out


def summary(run: Run) -> None:
    sec = run.results["sections"]
    for r in sec.get("matrix", {}).get("rows", []):
        if r["sparsity"] in (0.0, 0.5, 0.9):
            print(f"MAT {r['kernel']:<16} {r['dtype']} b{r['batch']} s={r['sparsity']:.2f} kept {r['union_kept']:.2f} x{r['speedup']:.2f}")
    print("\n==== summary (device {}, torch {}, triton {}) ====".format(
        sec.get("env", {}).get("device_name"), sec.get("env", {}).get("torch"), sec.get("env", {}).get("triton")))
    if "check" in sec:
        c = sec["check"]
        print(f"checks: {len(c['failures'])} failures")
    if "model" in sec:
        print(f"model: {json.dumps(sec['model'])}")
    if "bars" in sec:
        for r in sec["bars"]["rows"]:
            if r["sparsity"] in (0.0, 0.5, 0.9):
                print(f"BAR {r['kernel']:<18} s={r['sparsity']:.2f} x{r['speedup']:.2f} ({r['dense_us']:.1f} -> {r['sparse_us']:.1f} us)")
        for f in sec["bars"].get("floors", []):
            print(f"FLOOR {f['k']}x{f['n']}: nothing kept {f['nothing_kept_us']:.1f} us, empty kernel {f['empty_kernel_us']:.1f} us")
        for g in sec["bars"].get("gated", []):
            print(f"GATED s={g['sparsity']:.2f}: cuBLAS {g['cublas_gemv_us']:.1f} gated {g['gated_us']:.1f} unfused {g['unfused_us']:.1f} us")
    for r in sec.get("batches", {}).get("rows", []):
        print(f"BATCH {r['kernel']:<16} b{r['batch']} s={r['sparsity']:.2f} kept {r['union_kept']:.2f} x{r['speedup']:.2f} "
              f"(cuBLAS {r['dense_us']:.1f}, cuda-core {r['best_cuda_core_us']:.1f}, dot {r['best_dot_us']:.1f} us)")
    for name in (n for n in sec if n.startswith("e2e")):
        for res in sec[name].get("runs", []):
            print(f"E2E ({name}) {res['shape']} {res['dtype']} b{res['batch']}: hf {res.get('hf_tok_s', 0):.1f} dense {res['dense_tok_s']:.1f} tok/s; "
                  + " ".join(f"{l['target']:.2f}->x{l['speedup']:.2f}/{l['ideal_speedup']:.2f}" for l in res["levels"]))
    print("skipped:", run.results["skipped"], "errors:", list(run.results["errors"]))
    print(f"total {run.elapsed():.0f}s")


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    p.add_argument("--budget-s", type=float, default=540)
    p.add_argument("--sections", default="env,check,model,bars,topk,e2e,matrix,e2e-more",
                   help="comma-separated sections to run, in the fixed order above")
    p.add_argument("--hf", action="store_true", help="also time transformers' compiled static-cache generate")
    p.add_argument("--inductor", default="", help="comma-separated Inductor config flags to turn on (an experiment)")
    args = p.parse_args()
    for flag in filter(None, args.inductor.split(",")):
        import torch._inductor.config as inductor_config

        if not hasattr(inductor_config, flag):
            p.error(f"--inductor: torch._inductor.config has no {flag!r}")
        setattr(inductor_config, flag, True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, args.budget_s)
    wanted = set(args.sections.split(","))
    sections = [
        ("env", section_env, 5),
        ("check", section_check, 60),
        ("lowrank", section_lowrank, 60),
        ("attention", section_attention, 30),
        ("model", check_model, 40),
        ("bars", section_bars, 20),
        ("topk", section_topk, 40),
        ("e2e", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4, 0.25, 0.65, 0.9), hf=args.hf)]}, 100),
        ("e2e-nopdl", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False, dependent_launch=False)]}, 70),
        ("e2e-bars", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False)]}, 70),
        ("e2e-nocombo", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False,
                                                  inductor_options={})]}, 70),
        ("e2e-alone", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False, tune_in_step=False)]}, 70),
        ("e2e-topk", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False, selection="topk")]}, 70),
        ("e2e-sdpa", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 1, (0.5, 0.4), hf=False, decode_attention=False)]}, 70),
        ("matrix", section_matrix, 60),
        ("profile", section_profile, 60),
        ("e2e-more", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, 4, (0.5,), hf=False)]}, 90),
        ("batches", section_batches, 60),
        ("e2e-batch", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, b, (0.9, 0.5), hf=False, tune_in_step=False,
                                              backend="triton-batch8") for b in (4, 2)]}, 90),
        ("e2e-routed", lambda r: {"runs": [e2e(r, "llama3-8b", torch.bfloat16, b, (0.9, 0.5), hf=False, tune_in_step=False)
                                           for b in (4, 2)]}, 90),
    ]
    for name, fn, need_s in sections:
        if name in wanted:
            run.section(name, fn, need_s)
            if name == "check" and "check" in run.results["errors"]:
                break  # the kernels do not run: nothing after this would mean anything
    summary(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
