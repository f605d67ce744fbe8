"""A small static-KV-cache greedy decode loop, the same for dense and sparse models.

gpt-fast style: the prompt is prefilled eagerly into a transformers `StaticCache`; then every
decode step reads its token and position from fixed-address buffers and writes the next token
and position back into them. On CUDA the step (the `torch.compile`d model forward, the argmax and
that bookkeeping) is captured once as a CUDA graph and replayed per token with no host work in
between; on the CPU the same step runs compiled when asked (`compile=True`; eagerly by default),
without a CUDA graph but, like one, without re-checking the model between steps (no Dynamo
guards: `invalidate()` after changing the model). Whether the model is dense or sparse (and
whether its modules run their kernels, `actsparse.runtime.use_kernels`) only changes what its modules compute, never the loop, so the
dense and sparse timings compare like with like.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention import builds_on, use_decode_attention
from .errors import ActSparseError
from .kernels import tuning

ATTENTION_DEVICES = ("cuda", "cpu")  # the device types with a decode attention kernel
# the compiled CPU step's default (see DecodeEngine)
CPU_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "cpp_wrapper_build_separate": True}
# torch.compile's own cache per engine (torch >= 2.13); only then may a CPU step drop its guards
_COMPILE_ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def sliding_window(config) -> int | None:
    """The window of the model's sliding-attention layers (None: it has none)."""
    text = config.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return window


def cache_config(config, max_len: int):
    """`config`, or where no sequence of `max_len` reaches the sliding window, a copy whose layers
    all attend in full: the same attention, but the cache's layers then keep their positions in
    tensors (a sliding layer counts them in a Python int, frozen into a compiled step)."""
    window = sliding_window(config)
    if window is None or max_len > window:
        return config
    config = copy.deepcopy(config)
    text = config.get_text_config(decoder=True)
    text.sliding_window = None
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention" if t == "sliding_attention" else t for t in text.layer_types]
    return config


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # [batch, new tokens], on the CPU
    prefill_s: float
    decode_s: float  # the decode steps after the first new token
    steps: int

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput: tokens generated per second over the whole batch."""
        return self.tokens.shape[0] * self.steps / self.decode_s if self.steps else 0.0


class DecodeEngine:
    """Greedy decoding of `batch_size` equal-length prompts with at most `max_len` positions."""

    def __init__(
        self,
        model: nn.Module,
        max_len: int,
        batch_size: int = 1,
        compile: bool | str | None = None,
        cuda_graph: bool | None = None,
        dependent_launch: bool | None = None,
        decode_attention: bool | None = None,
        inductor_options: dict | None = None,
    ) -> None:
        """`decode_attention`: run the decode steps' attention through actsparse's decode attention
        kernel, Triton on CUDA and C++ on the CPU (`attention.use_decode_attention`, which switches
        the model's attention implementation; prefill keeps the model's own); None: on for models
        whose attention is "sdpa" or "eager", the ones it builds on. On the CPU it reads only the
        cache positions filled so far, where SDPA works over the whole static cache.
        `inductor_options`: Inductor options for the compiled step; None: on CUDA,
        ``{"combo_kernels": True}`` (independent small kernels of the step, such as the key and
        value cache writes, launched as one: on the H200 both the dense and the sparse Llama-3-8B
        step gain 1-3%, benchmarks/results/gpu_matrix/gpu_matrix_h200_2026-11-24_run20.json);
        on the CPU ``CPU_INDUCTOR_OPTIONS``: the step's ~250 kernel and op calls made from a
        C++ wrapper instead of Python (SmolLM2 bf16 TEAL 50%, one thread: 82.1 tok/s before, 91.3
        after, the runs of 01:28 and 03:53 in BENCHMARKS_HISTORY.md), at the price of a longer
        first compile (Inductor caches it on disk for later processes); the wrapper built apart
        from the fused kernels, at -O1 (it is glue: one function of ~450 op calls for R-Sparse's
        step, over which g++ -O3 made R-Sparse's cold `bench` on SmolLM2 take ~20 minutes; at
        -O1, 150 s, the decode as fast: BENCHMARKS.md, "CPU decode"); without Inductor's
        size asserts, which check each op's output strides with a `std::stringstream` built on
        every call (per-step overhead, not a check of results: the Python-wrapper test keeps
        them). ``{}`` compiles the Python wrapper.
        `dependent_launch`: compile the step's Inductor kernels for programmatic dependent launch
        (each kernel's launch overlaps the previous one's tail; Inductor's `triton.enable_pdl`);
        None: on for CUDA GPUs of compute capability 9.0 and later. actsparse's own kernels
        use it there regardless (`triton_ops.dependent_launch`)."""
        from transformers import StaticCache

        self.model = model.eval()
        self.device = next(model.parameters()).device
        on_cuda = self.device.type == "cuda"
        self.compile = on_cuda if compile is None else compile
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise ActSparseError(f"CUDA graphs need a CUDA model; this one is on {self.device}")
        self.max_len = max_len
        self.batch_size = batch_size
        window = sliding_window(model.config)
        if window is not None and max_len > window and (self.compile or self.cuda_graph):
            raise ActSparseError(
                f"max_len {max_len} is beyond the model's sliding attention window ({window}): transformers' "
                f"sliding cache layers count positions in Python, which a compiled step or a captured graph "
                f"would freeze; use max_len <= {window}, or compile=False and cuda_graph=False")
        self.cache = StaticCache(config=cache_config(model.config, max_len), max_cache_len=max_len)
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._out = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=self.device)
        # `generate(..., text=)`: the tokens fed instead of the argmax, and whether a text is given
        self._text = torch.zeros(batch_size, max_len + 1, dtype=torch.long, device=self.device)
        self._given = torch.zeros((), dtype=torch.bool, device=self.device)
        if dependent_launch is None:
            dependent_launch = on_cuda and torch.cuda.get_device_capability(self.device)[0] >= 9
        if dependent_launch and not on_cuda:
            raise ActSparseError(f"dependent launch needs a CUDA model; this one is on {self.device}")
        self.dependent_launch = dependent_launch
        if decode_attention is None:
            decode_attention = self.device.type in ATTENTION_DEVICES and builds_on(model)
        if decode_attention and self.device.type not in ATTENTION_DEVICES:
            raise ActSparseError(f"the decode attention kernel runs on {' and '.join(ATTENTION_DEVICES)} models; "
                                 f"this one is on {self.device}")
        if decode_attention:
            use_decode_attention(model)
        self.decode_attention = decode_attention
        if self.compile:
            backend = self.compile if isinstance(self.compile, str) else "inductor"
            if inductor_options is None:
                inductor_options = ({} if backend != "inductor" else
                                    {"combo_kernels": True} if on_cuda else CPU_INDUCTOR_OPTIONS)
            options = dict(inductor_options)
            if dependent_launch and backend == "inductor":
                options["triton.enable_pdl"] = True
            if options and backend != "inductor":
                raise ActSparseError(f"inductor_options need the inductor backend, not {backend!r}")
            self._compile_options = {"backend": backend, "dynamic": False, "options": options or None}
        # Without a CUDA graph (the CPU) the compiled step keeps no guards: SmolLM2's ~5,000 took
        # 1.4-2 ms a step under the profiler ("TorchDynamo Cache Lookup"). So the step is what was compiled (as a graph is what was captured): `invalidate`
        # compiles it again.
        self._unguarded = bool(self.compile) and not self.cuda_graph and _COMPILE_ISOLATES
        self._next = self._compiled_step() if self.compile else self._next_token
        self._graph: torch.cuda.CUDAGraph | None = None
        self._warm = False
        self.tuning_report: dict[str, dict[str, float]] = {}  # the last `tune`
        self.untuned: list[str] = []  # the problems the last `tune` left to their choice alone

    def _compiled_step(self):
        """The step compiled for this engine alone (`isolate_recompiles`: engines of other models in
        the process never share its entries), without guards on the CPU."""
        options = dict(self._compile_options["options"] or {})
        if self._unguarded:
            options["guard_filter_fn"] = torch.compiler.skip_all_guards_unsafe
        # torch < 2.13: engines share the entries of one cache, told apart by their guards
        isolation = {"isolate_recompiles": True} if _COMPILE_ISOLATES else {}
        return torch.compile(self._next_token, backend=self._compile_options["backend"], dynamic=False,
                             options=options, **isolation)

    def invalidate(self) -> None:
        """Drop the captured graph (the CPU's compiled step: compiled again at the next `generate`);
        call after `use_kernels` or a change of sparsity state."""
        self._graph = None
        self._warm = False
        if self._unguarded:
            self._next = self._compiled_step()

    def tune(self, input_ids: torch.Tensor, candidates: int = 10, tokens: int = 64,
             budget_s: float | None = None, text: torch.Tensor | None = None) -> dict[str, dict[str, float]]:
        """Re-choose the launch config of every kernel the decode step tunes by the step's own time.

        The kernels are first tuned one by one, each launched alone (`kernels.tuning`); inside the
        step they overlap their neighbours (programmatic dependent launch) and share the L2, so the
        order can differ. For each tuned problem in turn, the `candidates` fastest alone are each
        captured into the step and timed over `tokens` decode steps of `input_ids`; the fastest
        stays. Problems go largest share of the step first (calls a step times the fastest time
        alone); with `budget_s`, none starts after that many seconds of this in-step tuning (the
        first decode, which compiles and tunes each kernel alone, not counted) and the rest keep
        their choice alone (listed in `untuned`). `text`: as in `generate`. Returns, by problem, each candidate's seconds per step
        (empty when nothing is tuned, as on the CPU)."""
        if tokens < 2 or candidates < 1:
            raise ActSparseError(f"tune needs tokens >= 2 and candidates >= 1, got {tokens} and {candidates}")
        if budget_s is not None and not budget_s >= 0:
            raise ActSparseError(f"tune's budget_s must be a number of seconds >= 0, got {budget_s}")
        self.invalidate()
        with tuning.recording() as calls:
            self.generate(input_ids, 4, text)
        started = time.perf_counter()  # the budget is the in-step tuning's, not the compile's

        def seconds_per_step() -> float:
            self.invalidate()
            return min(self.generate(input_ids, tokens, text).decode_s for _ in range(2)) / (tokens - 1)

        keys = sorted((k for k in calls if len(tuning.ranked(k, candidates)) >= 2),
                      key=lambda k: calls[k] * tuning.best_seconds(k), reverse=True)
        report: dict[str, dict[str, float]] = {}
        self.untuned = []
        for key in tqdm(keys, desc="tuning in the decode step", unit="kernel", leave=False, disable=not keys):
            if budget_s is not None and time.perf_counter() - started > budget_s:
                self.untuned.append(str(key))
                continue
            times = {}
            for cfg in tuning.ranked(key, candidates):
                tuning.set_choice(key, cfg)
                times[cfg] = seconds_per_step()
            tuning.set_choice(key, min(times, key=times.get))
            report[str(key)] = {str(cfg): t for cfg, t in times.items()}
        self.invalidate()
        self.tuning_report = report
        return report

    def _next_token(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=token, past_key_values=self.cache, cache_position=pos, use_cache=True).logits
        # Given a text, the step still computes its argmax (the same work), then feeds the text.
        return torch.where(self._given, self._text.index_select(1, pos + 1)[:, 0], logits[:, -1].argmax(-1))

    def _step(self, compiled: bool = True) -> None:
        nxt = (self._next if compiled else self._next_token)(self._token, self._pos)
        self._token.copy_(nxt[:, None])
        self._pos.add_(1)
        self._out.index_copy_(1, self._pos, nxt[:, None])

    def _warm_up(self, input_ids: torch.Tensor) -> None:
        """One step not compiled (the kernels tune, and a backend measures its batched kernels
        against dense products, on real activations), then after prefilling again two compiled
        steps (compile, allocate) and, on CUDA, one step recorded as a graph. The steps advance
        the cache (transformers' static layers count positions themselves), so the caller
        prefills again afterwards."""
        side = torch.cuda.Stream() if self.cuda_graph else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._step(compiled=False)
            self._prefill(input_ids)
            for _ in range(2):
                self._step()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._step()
        self._warm = True

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _prefill(self, input_ids: torch.Tensor) -> None:
        """Empty the cache, run the prompt, and leave its next token and position in the buffers."""
        self.cache.reset()
        length = input_ids.shape[1]
        positions = torch.arange(length, device=self.device)
        logits = self.model(
            input_ids=input_ids.to(self.device), past_key_values=self.cache, cache_position=positions, use_cache=True
        ).logits
        first = torch.where(self._given, self._text[:, length], logits[:, -1].argmax(-1))
        self._token.copy_(first[:, None])
        self._pos.fill_(length)
        self._out[:, length] = first

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, text: torch.Tensor | None = None) -> DecodeResult:
        """Greedy continuation of `input_ids` [batch, L]: `max_new_tokens` tokens per prompt.

        With `text` [batch, >= max_new_tokens], each step feeds the text's next token instead of
        its own argmax (which it still computes): two models decode the same tokens, so their
        speed and sparsity are compared on one text rather than on each one's own output. The
        result's `tokens` are then the text's."""
        if input_ids.dim() != 2 or input_ids.shape[0] != self.batch_size:
            raise ActSparseError(f"input_ids must be [{self.batch_size}, L], got {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if max_new_tokens < 1 or length + max_new_tokens > self.max_len:
            raise ActSparseError(
                f"a {length}-token prompt and {max_new_tokens} new tokens need max_len >= {length + max_new_tokens}; "
                f"this engine has {self.max_len}"
            )
        if text is not None:
            if text.dim() != 2 or text.shape[0] != self.batch_size or text.shape[1] < max_new_tokens:
                raise ActSparseError(f"text must be [{self.batch_size}, >= {max_new_tokens}] tokens to feed, "
                                     f"got {tuple(text.shape)}")
            self._text[:, length : length + max_new_tokens] = text[:, :max_new_tokens].to(self.device)
        self._given.fill_(text is not None)
        self._sync()
        start = time.perf_counter()
        self._prefill(input_ids)
        steps = max_new_tokens - 1
        if steps and (self.compile or self.cuda_graph) and not self._warm:
            self._warm_up(input_ids)
            self._prefill(input_ids)
        self._sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(steps):
            if self._graph is not None:
                self._graph.replay()
            else:
                self._step()
        self._sync()
        decode_s = time.perf_counter() - start
        tokens = self._out[:, length : length + max_new_tokens].to("cpu", copy=True)  # not a view of the buffer
        return DecodeResult(tokens=tokens, prefill_s=prefill_s, decode_s=decode_s, steps=steps)
