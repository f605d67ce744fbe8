"""Dense-versus-sparse decode speed on one engine: the measurements behind `actsparse bench` and
the benchmark scripts.

Every sparse model measured here was made by `actsparse.sparsify_` (or loaded from what it saved);
dense and sparse decode with the same `DecodeEngine`, the sparse one through its kernels
(`runtime.use_kernels`). Every speed is also given as achieved weight GB/s and as a fraction of
the ideal ``1 / ((1 - f) + f (1 - s))``, f the share of the bytes a token reads that sit behind
sparsified inputs and s their measured sparsity.
"""
from __future__ import annotations

import datetime
import os
import platform
import time

import torch
from torch import nn

from .engine import DecodeEngine, DecodeResult
from .errors import ActSparseError
from .measure import SparsityReport, measure_sparsity
from .nn import SparseLinear

# Published shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings).
SHAPES = {
    "llama2-7b": ("LlamaConfig", 4096, 11008, 32, 32, 32, 32000, False),
    "llama3-8b": ("LlamaConfig", 4096, 14336, 32, 32, 8, 128256, False),
    "mistral-7b": ("MistralConfig", 4096, 14336, 32, 32, 8, 32000, False),
    "qwen2.5-7b": ("Qwen2Config", 3584, 18944, 28, 28, 4, 152064, False),
    "llama3.2-1b": ("LlamaConfig", 2048, 8192, 16, 32, 8, 128256, True),
    "smollm2-135m": ("LlamaConfig", 576, 1536, 30, 9, 3, 49152, True),
}
CALIBRATION_SHAPE = (4, 256)  # random calibration sequences x tokens for random weights


def shape_bytes(shape: str, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes of all weights, bytes of the decoder linears) of a published shape in `dtype`."""
    _, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    head_dim = hidden // heads
    linear = layers * (hidden * head_dim * (heads + 2 * kv) + heads * head_dim * hidden + 3 * hidden * inter)
    total = linear + vocab * hidden * (1 if tied else 2)
    size = torch.finfo(dtype).bits // 8
    return total * size, linear * size


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a new model on `device` (None where it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(shape: str, dtype: torch.dtype, device: torch.device, kernels: bool) -> None:
    """Refuse, before anything is built, a random-weight `shape` the device cannot hold: its
    weights, plus the kernels' input-major copy of the linears on CUDA, plus a tenth for the rest."""
    if shape not in SHAPES:
        raise ActSparseError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    total, linear = shape_bytes(shape, dtype)
    need = int(1.1 * (total + (linear if kernels and device.type == "cuda" else 0)))
    free = available_bytes(device)
    if free is not None and need > free:
        raise ActSparseError(f"--shape {shape} in {str(dtype).removeprefix('torch.')} needs about {need / 2**30:.1f} GiB "
                             f"on {device.type}; {free / 2**30:.1f} GiB is free (try --dtype bf16, a smaller shape, "
                             "or another device)")


def random_model(shape: str, dtype: torch.dtype, device: str | torch.device, seed: int | None = None,
                 **config_overrides) -> nn.Module:
    """A causal LM of a published shape with random weights, built directly on `device`; the same
    `seed` gives the same weights. `config_overrides` go to the config (e.g. ``hidden_act="relu"``)."""
    import transformers

    if shape not in SHAPES:
        raise ActSparseError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    cls, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    config = getattr(transformers, cls)(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=4096,
        **config_overrides,
    )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        if seed is not None:
            torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def random_calibration(model: nn.Module, seed: int = 1) -> torch.Tensor:
    """Random token ids to calibrate a random-weight model with (its activations are what matter)."""
    return torch.randint(0, model.config.vocab_size, CALIBRATION_SHAPE, generator=torch.Generator().manual_seed(seed))


def read_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the decoder linears, bytes of everything else a token reads: the LM head)."""
    linears = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, SparseLinear))
    head = model.get_output_embeddings().weight
    return linears, head.numel() * head.element_size()


def ideal_speedup(f: float, s: float, extra: float = 0.0) -> float:
    """The speed-up if time followed weight bytes: f of the bytes sit behind inputs a token skips
    a fraction s of; `extra` more bytes (a fraction of those f) are read only by the sparse model
    (LaRoSA's rotations)."""
    return 1.0 / ((1.0 - f) + f * (1.0 - s + extra))


def rotation_reads(model: nn.Module) -> float:
    """Reads of a sparsified model's online rotations, as a fraction of its linears' reads."""
    return float(getattr(model, "actsparse_recipe", {}).get("rotation_reads", 0.0))


def measured_report(model: nn.Module, sequence: torch.Tensor) -> SparsityReport:
    """Sparsity measured over the tokens of `sequence` (`actsparse.measure`)."""
    with torch.inference_mode(), measure_sparsity(model) as meter:
        model(input_ids=sequence.to(next(model.parameters()).device), use_cache=False)
    return meter.report()


def measured_sparsity(model: nn.Module, sequence: torch.Tensor) -> float:
    """Model-level sparsity (weight reads skipped) over the tokens of `sequence`, per token."""
    return measured_report(model, sequence).model


def hf_generate_speed(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """transformers' own `generate` decode speed (tokens/s over the batch): with a static KV cache,
    which it compiles with mode="reduce-overhead", on CUDA; its default on the CPU. Prefill is
    taken out by timing a short and a long generation."""
    prompt = prompt.to(next(model.parameters()).device)
    kwargs = dict(do_sample=False, pad_token_id=0)
    if prompt.device.type == "cuda":
        kwargs["cache_implementation"] = "static"

    def run(n: int) -> float:
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        if prompt.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    short = max(2, tokens // 8)
    run(short)  # compiles on CUDA
    run(tokens)
    return prompt.shape[0] * (tokens - short) / (run(tokens) - run(short))


def timed_decode(engine: DecodeEngine, prompt: torch.Tensor, tokens: int, repeats: int, tune: bool = True,
                 tune_candidates: int = 10, tune_budget_s: float | None = None,
                 text: torch.Tensor | None = None) -> DecodeResult:
    """The fastest of `repeats` decodes, after a short warm-up decode (compile, tune, capture);
    on CUDA with `tune`, the kernels' launch configs are first re-chosen inside the decode step
    among the `tune_candidates` fastest alone, for `tune_budget_s` seconds at most (`DecodeEngine.tune`).
    With `text`, every decode feeds it instead of the model's own tokens (`DecodeEngine.generate`)."""
    if tune and engine.device.type == "cuda":
        engine.tune(prompt, candidates=tune_candidates, tokens=min(tokens, 64), budget_s=tune_budget_s, text=text)
    engine.generate(prompt, min(tokens, 4), text)
    runs = [engine.generate(prompt, tokens, text) for _ in range(repeats)]
    return max(runs, key=lambda r: r.tokens_per_s)


def step_profile(engine: DecodeEngine, prompt: torch.Tensor, steps: int = 8, top: int = 25) -> dict:
    """GPU time per decode step by kernel name, largest first: a decode of 1 and of ``steps + 1``
    tokens under the profiler, the first (prefill) taken out of the second. Call it warm."""
    per_run = []
    for new_tokens in (1, steps + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            engine.generate(prompt, new_tokens)
        per_run.append({e.key: (e.device_time_total, e.count) for e in prof.key_averages()})
    prefill, whole = per_run
    kernels = {}
    for key, (us, count) in whole.items():
        us0, count0 = prefill.get(key, (0, 0))
        if us - us0 > 0:
            kernels[key] = ((us - us0) / steps, (count - count0) / steps)
    largest = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_us_per_step": sum(us for us, _ in kernels.values()),
            "kernels_per_step": sum(c for _, c in kernels.values()),
            "top": [{"kernel": k[:120], "us_per_step": us, "calls_per_step": c} for k, (us, c) in largest]}


CPU_STEP_PARTS = (  # (part, the profiler names that make it up, by prefix)
    ("linear kernels", ("actsparse::input_sparse", "actsparse::output_sparse_rows", "actsparse::dense_linear")),
    ("attention kernel", ("actsparse::decode_attention",)),
    ("compiled graph: Inductor's fused kernels and its wrapper", ("## Call CompiledFxGraph",)),
    ("Dynamo: frame entry, guards, input gathering",
     ("TorchDynamo Cache Lookup", "Pregraph bytecode", "Torch-Compiled Region", "AOTDispatcher")),
)


def cpu_step_profile(engine: DecodeEngine, prompt: torch.Tensor, steps: int = 16) -> dict:
    """Where a compiled CPU decode step's time goes: self CPU microseconds per step under the
    profiler (which adds its own cost per call), by `CPU_STEP_PARTS`, the LM head apart from the
    other linears, everything else as "other ops", over the events from the first compiled step
    on (the prefill left out). Call it on a warm engine."""
    vocab = engine.model.config.get_text_config().vocab_size
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        engine.generate(prompt, steps + 1)
    events = prof.events()
    starts = [e.time_range.start for e in events if e.name.startswith("Torch-Compiled Region")]
    if not starts:
        raise ActSparseError("cpu_step_profile needs an engine whose steps run compiled (compile=True)")
    us: dict[str, float] = {}
    for e in events:
        if e.time_range.start < min(starts):
            continue
        if e.name == "actsparse::dense_linear" and len(e.input_shapes) > 1 and e.input_shapes[1][:1] == [vocab]:
            part = "LM head"
        else:
            part = next((p for p, prefixes in CPU_STEP_PARTS if e.name.startswith(prefixes)), "other ops")
        us[part] = us.get(part, 0.0) + e.self_cpu_time_total / steps
    return {"us_per_step": sum(us.values()), "parts": dict(sorted(us.items(), key=lambda kv: -kv[1]))}


def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        import triton

        env.update(device_name=torch.cuda.get_device_name(device), triton=triton.__version__)
    else:
        env.update(device_name=f"{_cpu_model()} ({os.cpu_count()} cores)")
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def speed_result(
    dense: DecodeResult, sparse: DecodeResult, sparsity: float, linear_bytes: int, other_bytes: int, batch: int,
    rotation: float = 0.0,
) -> dict:
    """The comparison of one dense and one sparse decode as the `bench` JSON fields; `rotation`
    as `rotation_reads`."""
    total = linear_bytes + other_bytes
    f = linear_bytes / total
    steps_dense = dense.tokens_per_s / batch
    steps_sparse = sparse.tokens_per_s / batch
    speedup = sparse.tokens_per_s / dense.tokens_per_s
    ideal = ideal_speedup(f, sparsity, rotation)
    return {
        "dense_tok_s": dense.tokens_per_s,
        "sparse_tok_s": sparse.tokens_per_s,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal,
        "sparsity": sparsity,
        "sparsified_byte_fraction": f,
        "rotation_reads": rotation,
        "dense_gb_s": total * steps_dense / 1e9,
        "sparse_gb_s": (linear_bytes * (1.0 - sparsity + rotation) + other_bytes) * steps_sparse / 1e9,
        "batch": batch,
    }
