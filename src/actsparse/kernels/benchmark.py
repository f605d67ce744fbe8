"""Dense-versus-sparse decode speed on one engine: the measurement behind `actsparse bench`.

Real-shaped random-weight models (no weights reach a lent GPU) get their thresholds from their
own activations (`collect_scores` + `impose_sparsity`: TEAL's uniform rule, or CATS on the gate);
real models go through `actsparse.sparsify_`. Both paths decode with the same `DecodeEngine`;
the sparse one through its kernels (`runtime.use_kernels`). Every speed is also given as achieved weight GB/s and as
a fraction of the ideal ``1 / ((1 - f) + f (1 - s))``, f the share of the bytes a token reads
that sit behind sparsified inputs and s their measured sparsity.
"""
from __future__ import annotations

import datetime
import os
import platform
import time
import contextlib

import torch
from torch import nn

from ..calibrate import topk_count
from ..engine import DecodeEngine, DecodeResult
from ..errors import ActSparseError
from ..measure import measure_sparsity
from ..nn import SparseGatedMLP, SparseLinear
from ..swap import swap_modules

# Published shapes (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings).
SHAPES = {
    "llama2-7b": ("LlamaConfig", 4096, 11008, 32, 32, 32, 32000, False),
    "llama3-8b": ("LlamaConfig", 4096, 14336, 32, 32, 8, 128256, False),
    "mistral-7b": ("MistralConfig", 4096, 14336, 32, 32, 8, 32000, False),
    "qwen2.5-7b": ("Qwen2Config", 3584, 18944, 28, 28, 4, 152064, False),
    "llama3.2-1b": ("LlamaConfig", 2048, 8192, 16, 32, 8, 128256, True),
    "smollm2-135m": ("LlamaConfig", 576, 1536, 30, 9, 3, 49152, True),
}
METHODS = ("teal", "cats")


def random_model(shape: str, dtype: torch.dtype, device: str | torch.device) -> nn.Module:
    """A causal LM of a published shape with random weights, built directly on `device`."""
    import transformers

    if shape not in SHAPES:
        raise ActSparseError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    cls, hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    config = getattr(transformers, cls)(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied, max_position_embeddings=4096,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def collect_scores(model: nn.Module, input_ids: torch.Tensor, method: str) -> dict[str, torch.Tensor]:
    """Sorted activation scores per module, from one forward: |x| at every linear's input (teal),
    or |act(gate)| per MLP (cats)."""
    if method not in METHODS:
        raise ActSparseError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    specs = swap_modules(model)
    scores: dict[str, torch.Tensor] = {}
    handles = []
    for spec in specs:
        if method == "teal":
            for name in spec.linear_names().values():
                hook = lambda m, args, name=name: scores.__setitem__(name, args[0].detach().abs().float().flatten())
                handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        else:
            mlp = spec.mlp
            gate = mlp.gate_up_linear if mlp.gate_up_linear is not None else mlp.gate_linear

            def hook(m, args, out, name=spec.mlp_prefix, mlp=mlp, fused=mlp.gate_up_linear is not None):
                g = out.chunk(2, dim=-1)[0] if fused else out
                scores[name] = mlp.act_fn(g).detach().abs().float().flatten()

            handles.append(gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(input_ids=input_ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sort().values for name, s in scores.items()}


def impose_sparsity(model: nn.Module, scores: dict[str, torch.Tensor], sparsity: float) -> None:
    """Thresholds at the `sparsity` quantile of each module's own scores. A module already
    thresholded is updated in place, so captured graphs and compiled code stay valid."""
    for name, sorted_scores in scores.items():
        module = model.get_submodule(name)
        t = float(sorted_scores[min(len(sorted_scores) - 1, int(sparsity * len(sorted_scores)))]) if sparsity > 0 else -1.0
        if isinstance(module, SparseLinear):
            if module.mode == "threshold":
                module.threshold.fill_(t)
                module.target = sparsity
            else:
                module.set_threshold(t, sparsity)
        elif isinstance(module, SparseGatedMLP):
            if module.gate_mode == "threshold":
                module.gate_threshold.fill_(t)
                module.gate_target = sparsity
            else:
                module.set_gate_threshold(t, sparsity)


def impose_topk(model: nn.Module, sparsity: float, method: str = "teal") -> None:
    """Top-K selection (LaRoSA's, and ``selection="topk"``): each token keeps ``(1 - sparsity)``
    of every sparse linear's inputs (teal), or of every MLP's gate activations (cats)."""
    if method not in METHODS:
        raise ActSparseError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for module in model.modules():
        if method == "teal" and isinstance(module, SparseLinear):
            module.set_topk(topk_count(module.in_features, sparsity), sparsity)
        elif method == "cats" and isinstance(module, SparseGatedMLP):
            module.set_gate_topk(topk_count(module.intermediate_size, sparsity), sparsity)


@contextlib.contextmanager
def dense_modes(model: nn.Module):
    """Every actsparse module of `model` in dense mode for the block (the dense baseline of a
    model that was loaded sparse); the sparse state is restored after."""
    saved = []
    for module in model.modules():
        if isinstance(module, SparseLinear):
            saved.append((module, "mode", module.mode))
            module.mode = "dense"
        elif isinstance(module, SparseGatedMLP):
            saved.append((module, "gate_mode", module.gate_mode))
            module.gate_mode = "dense"
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


def read_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of the decoder linears, bytes of everything else a token reads: the LM head)."""
    linears = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, SparseLinear))
    head = model.get_output_embeddings().weight
    return linears, head.numel() * head.element_size()


def ideal_speedup(f: float, s: float) -> float:
    return 1.0 / ((1.0 - f) + f * (1.0 - s))


def measured_sparsity(model: nn.Module, sequence: torch.Tensor) -> float:
    """Model-level sparsity (weight reads skipped) over the tokens of `sequence`, per token."""
    with torch.inference_mode(), measure_sparsity(model) as meter:
        model(input_ids=sequence.to(next(model.parameters()).device), use_cache=False)
    return meter.report().model


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


def timed_decode(engine: DecodeEngine, prompt: torch.Tensor, tokens: int, repeats: int, tune: bool = True) -> DecodeResult:
    """The fastest of `repeats` decodes, after a short warm-up decode (compile, tune, capture);
    on CUDA with `tune`, the kernels' launch configs are first re-chosen inside the decode step
    (`DecodeEngine.tune`)."""
    if tune and engine.device.type == "cuda":
        engine.tune(prompt, tokens=min(tokens, 64))
    engine.generate(prompt, min(tokens, 4))
    runs = [engine.generate(prompt, tokens) for _ in range(repeats)]
    return max(runs, key=lambda r: r.tokens_per_s)


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
    dense: DecodeResult, sparse: DecodeResult, sparsity: float, linear_bytes: int, other_bytes: int, batch: int
) -> dict:
    """The comparison of one dense and one sparse decode as the `bench` JSON fields."""
    total = linear_bytes + other_bytes
    f = linear_bytes / total
    steps_dense = dense.tokens_per_s / batch
    steps_sparse = sparse.tokens_per_s / batch
    speedup = sparse.tokens_per_s / dense.tokens_per_s
    ideal = ideal_speedup(f, sparsity)
    return {
        "dense_tok_s": dense.tokens_per_s,
        "sparse_tok_s": sparse.tokens_per_s,
        "speedup": speedup,
        "ideal_speedup": ideal,
        "fraction_of_ideal": speedup / ideal,
        "sparsity": sparsity,
        "sparsified_byte_fraction": f,
        "dense_gb_s": total * steps_dense / 1e9,
        "sparse_gb_s": (linear_bytes * (1.0 - sparsity) + other_bytes) * steps_sparse / 1e9,
        "batch": batch,
    }
