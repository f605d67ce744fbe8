"""Choose a launch configuration per problem key by timing the candidates once, on real inputs.

Each candidate is timed as ten launches captured in a CUDA graph (so that Python launch overhead
does not decide), each after a write that evicts the L2 cache (decode reads every weight once per
token, so a weight is never in L2 when its linear runs; the time of the writes alone is
subtracted), on the first call with a new key. That first call must come before any CUDA
graph capture of the caller: the decode engine runs one eager warm-up step for this. A key seen
for the first time during a capture, or under the Triton interpreter, takes the first
candidate untimed. A candidate that raises `Unlaunchable` (a grid the device cannot hold at once)
is recorded with an infinite time and never chosen.

`save` writes every choice and timing to a JSON file and `load` reads them back on the same GPU
and Triton version, so that a later process (another run of an 8B model, the next call on a lent
machine) skips the timing: a loaded key is chosen as saved when the kernel still offers that
configuration among its candidates, else tuned again.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Hashable, Sequence, TypeVar

import torch

from ..errors import ActSparseError
from ..outputs import write_json_atomic

Config = TypeVar("Config")

_LOG = logging.getLogger(__name__)  # one INFO line per problem tuned (which ones take long to compile)
_CHOICES: dict[Hashable, object] = {}
_TIMINGS: dict[Hashable, list[tuple[object, float]]] = {}
_RECORDERS: list[dict[Hashable, int]] = []
_LOADED: dict[Hashable, tuple[str, list[tuple[str, float]]]] = {}  # key -> (chosen, timings), by repr
CACHE_FORMAT = 1

# Sparsity bins used in tuning keys: a kernel tuned at 50% sparsity is not the best one at 90%.
SPARSITY_EDGES = (0.2, 0.45, 0.6, 0.8)


class Unlaunchable(ValueError):
    """A candidate configuration that cannot run this problem on this device (the tuner skips it)."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sparsity_bin(sparsity: float | None) -> int:
    if sparsity is None:
        return -1
    return sum(sparsity >= edge for edge in SPARSITY_EDGES)


def choose(key: Hashable, candidates: Sequence[Config], launch: Callable[[Config], None], device: torch.device) -> Config:
    """The fastest of `candidates` for `key` (timed once, then remembered)."""
    for calls in _RECORDERS:
        calls[key] = calls.get(key, 0) + 1
    if key in _CHOICES:
        return _CHOICES[key]  # type: ignore[return-value]
    if key in _LOADED and _restore(key, candidates):
        return _CHOICES[key]  # type: ignore[return-value]
    if len(candidates) == 1 or interpreting() or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return candidates[0]
    started = time.perf_counter()
    best, timings = fastest(key, candidates, lambda cfg: seconds(lambda: launch(cfg), device))
    _CHOICES[key] = best
    _TIMINGS[key] = timings
    _LOG.info("tuned %s: %d candidates in %.1f s, best %.1f us", key, len(candidates),
              time.perf_counter() - started, min(t for _, t in timings) * 1e6)
    return best


def fastest(key: Hashable, candidates: Sequence[Config], seconds: Callable[[Config], float]) -> tuple[Config, list[tuple[Config, float]]]:
    """The candidate with the least `seconds`, and every candidate's time (infinite for the
    `Unlaunchable` ones)."""
    timings = []
    for cfg in candidates:
        try:
            timings.append((cfg, seconds(cfg)))
        except Unlaunchable:
            timings.append((cfg, math.inf))
    best, least = min(timings, key=lambda ct: ct[1])
    if math.isinf(least):
        raise Unlaunchable(f"{key}: none of the {len(candidates)} candidates can run here")
    return best, timings


def tuned() -> dict[Hashable, object]:
    """Every key tuned so far and the configuration chosen (for reports)."""
    return dict(_CHOICES)


def timings() -> dict[Hashable, list[tuple[object, float]]]:
    """Seconds per launch of every candidate timed so far, by key."""
    return dict(_TIMINGS)


@contextlib.contextmanager
def recording():
    """Count, by key in the order first met, the `choose` calls made inside the block."""
    calls: dict[Hashable, int] = {}
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        # by identity: a block nested in another that met the same keys holds an equal dict
        del _RECORDERS[next(i for i, c in enumerate(_RECORDERS) if c is calls)]


def ranked(key: Hashable, n: int) -> list[object]:
    """The `n` candidates of `key` that ran fastest alone (none if `key` was not timed)."""
    finite = sorted((ct for ct in _TIMINGS.get(key, []) if math.isfinite(ct[1])), key=lambda ct: ct[1])
    return [cfg for cfg, _ in finite[:n]]


def best_seconds(key: Hashable) -> float:
    """Seconds of the fastest candidate of `key` timed alone (0 if `key` was not timed)."""
    return min((t for _, t in _TIMINGS.get(key, []) if math.isfinite(t)), default=0.0)


def set_choice(key: Hashable, cfg: object) -> None:
    """Make `cfg` the choice for `key` (one of its timed candidates)."""
    if cfg not in [c for c, _ in _TIMINGS.get(key, [])]:
        raise ValueError(f"{cfg} is not a timed candidate of {key}")
    _CHOICES[key] = cfg


def clear() -> None:
    _CHOICES.clear()
    _TIMINGS.clear()
    _LOADED.clear()


def save(path: str | os.PathLike, device_name: str | None = None) -> int:
    """Write every key chosen so far, its choice and its candidates' times, to `path` (JSON);
    returns the number of keys. Keys loaded but not met in this process are kept."""
    entries = {_encode(key): (repr(cfg), [(repr(c), t) for c, t in _TIMINGS.get(key, [])])
               for key, cfg in _CHOICES.items()}
    for key, (chosen, times) in _LOADED.items():
        entries.setdefault(_encode(key), (chosen, times))
    document = {"format": CACHE_FORMAT, **_environment(device_name),
                "entries": [{"key": k, "chosen": chosen, "timings": [[c, t if math.isfinite(t) else None] for c, t in times]}
                            for k, (chosen, times) in sorted(entries.items())]}
    write_json_atomic(path, document)
    return len(entries)


def load(path: str | os.PathLike, device_name: str | None = None) -> int:
    """Take the choices saved in `path` by `save` on this GPU model and Triton version; returns
    the number of keys. A file from another GPU or Triton is refused: its choices do not carry."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
        entries = {_decode(e["key"]): (e["chosen"], [(c, math.inf if t is None else float(t)) for c, t in e["timings"]])
                   for e in document["entries"]}
        saved = {k: document[k] for k in ("format", "device", "triton")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ActSparseError(f"{path}: not a tuning cache written by actsparse ({type(e).__name__}: {e})") from None
    here = {"format": CACHE_FORMAT, **_environment(device_name)}
    if saved != here:
        raise ActSparseError(f"{path}: tuned for {saved}, this is {here}; tune again (leave the cache out)")
    _LOADED.update(entries)
    return len(entries)


def _restore(key: Hashable, candidates: Sequence[object]) -> bool:
    """Make the loaded choice of `key` the current one, if it is still one of `candidates`."""
    chosen, times = _LOADED[key]
    by_repr = {repr(c): c for c in candidates}
    if chosen not in by_repr:
        return False
    _CHOICES[key] = by_repr[chosen]
    _TIMINGS[key] = [(by_repr[c], t) for c, t in times if c in by_repr]
    return True


def _environment(device_name: str | None) -> dict[str, str]:
    import triton

    if device_name is None:
        device_name = torch.cuda.get_device_name()
    return {"device": device_name, "triton": triton.__version__}


def _encode(key: object) -> str:
    """A tuning key (nested tuples of numbers, strings, booleans, None and dtypes) as JSON text."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).removeprefix("torch.")}
        return v
    return json.dumps(plain(key))


def _decode(text: str) -> Hashable:
    def back(v):
        if isinstance(v, list):
            return tuple(back(x) for x in v)
        if isinstance(v, dict):
            return getattr(torch, v["dtype"])
        return v
    return back(json.loads(text))


def seconds(fn: Callable[[], object], device: torch.device, launches: int = 10, replays: int = 5) -> float:
    """Seconds per call of `fn` (CUDA work only): `launches` calls in a CUDA graph, each after
    a write that evicts the L2 (whose time is subtracted), best of `replays`."""
    fn()  # compiles the variant and allocates outside the capture
    flush = _l2_flush_buffer(device.index if device.index is not None else torch.cuda.current_device())
    with_flush = _best_replay(lambda: (flush.zero_(), fn()), launches, replays)
    flush_only = _best_replay(flush.zero_, launches, replays)
    return max(with_flush - flush_only, 0.0) / launches


_FLUSH: dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: int) -> torch.Tensor:
    if device not in _FLUSH:
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        # Not an inference tensor, whatever mode the first tuning ran in: later ones write it outside.
        with torch.inference_mode(False):
            _FLUSH[device] = torch.empty(2 * l2, dtype=torch.uint8, device=f"cuda:{device}")
    return _FLUSH[device]


def _best_replay(fn: Callable[[], object], launches: int, replays: int) -> float:
    """Seconds of the fastest replay of a graph of `launches` calls of `fn`."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    del graph
    return best
