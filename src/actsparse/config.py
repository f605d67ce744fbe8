"""One frozen, versioned configuration dataclass per method, validated on construction.

Every config serialises to JSON through `to_dict` and back through `config_from_dict`, which
dispatches on the ``method`` name; subclasses register themselves by defining ``method``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ActSparseError

CONFIGS: dict[str, type["MethodConfig"]] = {}

SELECTIONS = ("threshold", "topk")
ALLOCATIONS = ("uniform", "greedy")


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method shares.

    sparsity:  the target (model-level weight reads skipped, or MLP intermediate zeros for the
               gate-driven methods; see each subclass).
    selection: "threshold" (calibrated, per-token sparsity fluctuates) or "topk" (exactly K kept
               per token).
    ignore:    fnmatch patterns of linear names (e.g. "*.0.mlp.down_proj") left dense.
    overrides: (pattern, sparsity) pairs that replace the target for matching linears.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    targets: ClassVar[str] = "model"  # which measured sparsity `sparsity` aims at: "model" or "mlp"
    tunes_weights: ClassVar[bool] = False  # a calibration-time optimisation of the weights (minutes, not seconds)

    sparsity: float = 0.5
    selection: str = "threshold"
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            CONFIGS[cls.method] = cls

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _typed(field.name, getattr(self, field.name), hints[field.name]))
        _check_fraction("sparsity", self.sparsity)
        if self.selection not in SELECTIONS:
            raise ActSparseError(
                f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}"
            )
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", tuple((str(p), float(s)) for p, s in self.overrides))
        for pattern, value in self.overrides:
            _check_fraction(f"override sparsity for {pattern!r}", value)

    def sparsity_for(self, name: str, default: float | None = None) -> float | None:
        """The target for one linear, or None when `ignore` leaves it dense."""
        if any(fnmatch.fnmatchcase(name, p) for p in self.ignore):
            return None
        for pattern, value in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return value
        return self.sparsity if default is None else default

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["ignore"] = list(self.ignore)
        data["overrides"] = [list(o) for o in self.overrides]
        return {"method": self.method, "version": self.version, **data}


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    if not isinstance(data, dict):
        raise ActSparseError(f"a method config must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("method", None)
    if not isinstance(name, str) or name not in CONFIGS:
        raise ActSparseError(f"unknown method {name!r}; known: {', '.join(sorted(CONFIGS))}")
    cls = CONFIGS[name]
    version = data.pop("version", cls.version)
    if version != cls.version:
        raise ActSparseError(
            f"{name} config version {version} is not supported (this actsparse reads version {cls.version})"
        )
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ActSparseError(f"unknown {name} config fields: {', '.join(unknown)}")
    return cls(**data)  # __post_init__ checks each field's type


def make_config(method: str, **fields: Any) -> MethodConfig:
    """Build a config by method name, e.g. ``make_config("teal", sparsity=0.4)``."""
    if method not in CONFIGS:
        raise ActSparseError(f"unknown method {method!r}; known: {', '.join(sorted(CONFIGS))}")
    cls = CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in fields if k not in known)
    if unknown:
        raise ActSparseError(f"method {method} has no option(s) {', '.join(unknown)}")
    return cls(**fields)


def config_fields(method: str) -> set[str]:
    """The field names of `method`'s config; none for an unknown method."""
    return {f.name for f in dataclasses.fields(CONFIGS[method])} if method in CONFIGS else set()


def parse_option(method: str, name: str, text: str) -> Any:
    """The value of config field `name` of `method` written as `text` on the command line (bools
    as true/false/1/0/yes/no, numbers as numbers, tuples as JSON lists, none for an optional field)."""
    if name not in config_fields(method):
        return text  # make_config names the unknown method or option
    kind = typing.get_type_hints(CONFIGS[method])[name]
    if _optional(kind) is not None and text.strip().lower() in ("none", "null"):
        return None
    base = _optional(kind) or kind
    try:
        if base is bool:
            value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[text.strip().lower()]
        elif base is int:
            value = int(text)
        elif base is float:
            value = float(text)
        elif base is str:  # plain, or quoted as a JSON string
            value = json.loads(text) if len(text) >= 2 and text[0] == text[-1] == '"' else text
        else:
            value = json.loads(text)
        return _typed(name, value, kind)
    except (KeyError, ValueError, ActSparseError):
        raise ActSparseError(f"--option {name}={text!r}: expected {_type_name(kind)}") from None


def _optional(kind: Any) -> Any:
    """X for `X | None`, else None."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


def _type_name(kind: Any) -> str:
    if _optional(kind) is not None:
        return f"{_type_name(_optional(kind))} or none"
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return "a pair [" + ", ".join(_type_name(a) for a in args) + "]"
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _typed(name: str, value: Any, kind: Any) -> Any:
    """`value` as a value of type `kind` (ints widen to floats, lists become tuples), or an error
    naming the field and the type it takes."""
    if _optional(kind) is not None:
        return None if value is None else _typed(name, value, _optional(kind))
    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(name, v, args[0]) for v in value)
        if len(args) == len(value):
            return tuple(_typed(name, v, a) for v, a in zip(value, args))
    elif kind is bool and isinstance(value, bool):
        return value
    elif kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise ActSparseError(f"{name} must be {_type_name(kind)}, got {value!r}")


def _check_fraction(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ActSparseError(f"{what} must be in [0, 1), got {value!r}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ActSparseError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


def _check_greedy(config: "MethodConfig") -> None:
    """greedy_step and greedy_tokens, on configs that offer the greedy allocation."""
    if not isinstance(config.greedy_step, (int, float)) or not 0.0 < config.greedy_step <= 0.5:
        raise ActSparseError(f"greedy_step must be in (0, 0.5], got {config.greedy_step!r}")
    if not isinstance(config.greedy_tokens, int) or config.greedy_tokens < 16:
        raise ActSparseError(f"greedy_tokens must be an integer of at least 16, got {config.greedy_tokens!r}")


@dataclass(frozen=True)
class DenseConfig(MethodConfig):
    """No sparsity: the baseline, through the same modules as every method."""

    method: ClassVar[str] = "dense"
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity != 0.0:
            raise ActSparseError(f"dense takes no sparsity, got {self.sparsity}")


@dataclass(frozen=True)
class TealConfig(MethodConfig):
    """TEAL: zero x_i where |x_i| <= t on the inputs of all seven linears.

    allocation: "uniform" gives every linear the target; "greedy" is TEAL's per-block search
    that raises, step by step, the sparsity of the projection whose increase least raises the
    block output error, keeping the block's parameter-weighted sparsity at the target.
    recalibrate: take the thresholds from a second calibration pass through the model already
    sparsified with the first pass's thresholds. TEAL calibrates on dense activations only; at
    high sparsity the sparse upstream layers shift the scores, so the measured sparsity drifts
    above the target (SmolLM2, 65%: 70% measured with dense-only thresholds).
    """

    method: ClassVar[str] = "teal"
    allocation: str = "uniform"
    greedy_step: float = 0.05
    greedy_tokens: int = 1024
    recalibrate: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_greedy(self)


@dataclass(frozen=True)
class WinaConfig(TealConfig):
    """WINA: like TEAL with the score |x_i| * ||W[:, i]||_2 (weight-informed)."""

    method: ClassVar[str] = "wina"


@dataclass(frozen=True)
class CatsConfig(MethodConfig):
    """CATS: threshold on |act(gate)| inside the MLP; skips `up` rows and `down` columns.

    `sparsity` targets the fraction of zero MLP intermediate activations (sparsity.mlp).
    """

    method: ClassVar[str] = "cats"
    targets: ClassVar[str] = "mlp"
    recalibrate: bool = True


PROSPARSE_SCHEDULES = ("progressive", "constant")
L1_REDUCTIONS = ("sum", "mean")
# The paper's lambda stage tables, as (end step, lambda) pairs (arXiv 2402.13516): stage 0 (ReLU
# swap only, lambda 0), a warm-up stage at constant lambda_1, then half-sine ramps between stage
# values. Training scales the steps to its own length.
PROSPARSE_PRESETS: dict[str, tuple[tuple[int, float], ...]] = {
    "7b": ((5000, 0.0), (6000, 5e-3), (10000, 5e-2), (12000, 5e-2), (16000, 0.2), (16500, 0.2)),
    "1b": ((10000, 0.0), (15000, 1e-3), (20000, 5e-3), (25000, 5e-3), (35000, 5e-2)),
}


@dataclass(frozen=True)
class ProSparseConfig(MethodConfig):
    """ProSparse: the gate activation becomes ReLU, training with an L1 penalty on the MLP
    intermediate makes it sparse, and FATReLU (``x if x > t else 0``) is applied at inference.

    There is no sparsity target: the sparsity comes from training and is measured (sparsity.mlp).
    threshold: FATReLU's t on the ReLU gate output (0 is plain ReLU).
    train_threshold: FATReLU's t while training (0, the paper's: plain ReLU, the threshold is
               shifted at inference only); > 0 trains the model under the mask it will run with.
    schedule:  "progressive" (the paper's stages with half-sine ramps) or "constant" (lambda 0
               during stage 0, then the final lambda throughout: the ablation).
    preset:    which paper stage table, "7b" or "1b"; `stages` replaces it when given, as
               (end step, lambda) pairs in any step unit (they are scaled to the run's length).
    peak_lambda: rescales every lambda so the last stage reaches this value (None: the table's).
    l1_reduce: how the per-layer terms mean(|act(g) * u|) combine: "sum" or "mean" over layers.
    """

    method: ClassVar[str] = "prosparse"
    targets: ClassVar[str] = "mlp"
    sparsity: float = 0.0
    threshold: float = 0.01
    train_threshold: float = 0.0
    schedule: str = "progressive"
    preset: str = "7b"
    stages: tuple[tuple[float, float], ...] = ()
    peak_lambda: float | None = None
    l1_reduce: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sparsity != 0.0:
            raise ActSparseError(
                f"prosparse takes no sparsity target (got {self.sparsity}); its sparsity comes from training"
            )
        if self.selection != "threshold":
            raise ActSparseError(f"prosparse uses a FATReLU threshold, not selection {self.selection!r}")
        for name in ("threshold", "train_threshold"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise ActSparseError(f"{name} must be a number >= 0, got {value!r}")
        _check_choice("schedule", self.schedule, PROSPARSE_SCHEDULES)
        _check_choice("preset", self.preset, tuple(PROSPARSE_PRESETS))
        _check_choice("l1_reduce", self.l1_reduce, L1_REDUCTIONS)
        stages = tuple((float(t), float(lam)) for t, lam in self.stages)
        object.__setattr__(self, "stages", stages)
        table = stages or PROSPARSE_PRESETS[self.preset]
        steps = [t for t, _ in table]
        if len(table) < 2 or steps != sorted(steps) or len(set(steps)) != len(steps) or steps[0] <= 0:
            raise ActSparseError(
                f"stages must hold at least two (end step, lambda) pairs with increasing end steps > 0, got {table}"
            )
        if any(lam < 0 for _, lam in table) or table[0][1] != 0.0:
            raise ActSparseError(f"stage lambdas must be >= 0, with 0 for stage 0 (the ReLU swap), got {table}")
        if self.peak_lambda is not None and not self.peak_lambda > 0:
            raise ActSparseError(f"peak_lambda must be > 0, got {self.peak_lambda}")

    def stage_table(self) -> tuple[tuple[float, float], ...]:
        """(end step, lambda) pairs in the table's own step unit, lambdas rescaled by peak_lambda."""
        table = self.stages or PROSPARSE_PRESETS[self.preset]
        if self.peak_lambda is None:
            return tuple((float(t), float(lam)) for t, lam in table)
        last = table[-1][1]
        if last == 0:
            raise ActSparseError("peak_lambda needs a stage table whose last lambda is > 0")
        return tuple((float(t), lam * self.peak_lambda / last) for t, lam in table)


RSPARSE_ALLOCATIONS = ("uniform", "greedy", "search", "greedy+search")
LAROSA_ALLOCATIONS = ("coefficients", "greedy")
RSPARSE_SCORES = ("wina", "magnitude")
LAROSA_ROTATIONS = ("per-layer", "residual")
RSPARSE_SEARCH_OVER = ("alpha", "alpha+sparsity")
RSPARSE_SEARCH_FITNESS = ("loss", "kl")
KL_SCHEDULES = ("constant", "cosine")
RSPARSE_LOWRANK = ("svd", "dropped")


@dataclass(frozen=True)
class RSparseConfig(MethodConfig):
    """R-Sparse: ``y = W (x * m) + U_r S_r V_r^T (x * (1 - m))`` with ``m = score(x) > t``.

    sparsity: target of sparsity.model; the rank-r factors count as reads, so each linear at
              (s, alpha) reads as many weights as a plain linear at s.
    alpha:    the share of a linear's read budget spent on exact channels; the rest buys rank
              (1 = no low-rank path, i.e. WINA-style masking).
    score:    "wina" (|x_i| * ||W[:, i]||_2, the paper's) or "magnitude" (|x_i|).
    lowrank:  "svd" (the paper's: top-r SVD of W) or "dropped" (top-r PCA of W x_d, the dropped
              channels' contribution on calibration data: one more calibration pass).
    recalibrate: thresholds from a second calibration pass through the sparsified model, whose
              activations are what each linear sees at inference (False: dense activations only,
              the paper's; then measured sparsity drifts above the target in deep layers).
    shared_selection: linears that read one input (q/k/v, gate/up) select their channels as one:
              one score (for "wina", each member's squared column norms as shares of its own
              total, summed), one threshold at their combined channel budget (the reads stay the
              plan's); the kernels then run each group as one call with one low-rank product.
              False (default): each linear its own score and threshold, the paper's and on SmolLM2
              the more accurate (BENCHMARKS_HISTORY.md).
    role_coefficients: (role, c) pairs (roles q, k, v, qkv, o, gate, up, gate_up, down); a role's
              sparsity is c * s, rescaled so the parameter-weighted mean stays s. Empty = uniform s.
    allocation: "uniform" (every linear at its target and `alpha`); "greedy": TEAL's per-block
              greedy search over per-linear sparsity (see TealConfig), each linear in its R-Sparse
              state at `alpha`, so the low-rank path's compensation is part of the block error it
              minimises (role_coefficients are then not used); "search": a seeded evolutionary
              search over per-layer alpha (and, with search_over="alpha+sparsity", per-layer
              sparsity at a fixed model-level budget) minimising `search_fitness` on
              `search_windows` calibration windows; "greedy+search": the search started from the
              greedy allocation.
    search_fitness: "loss" (the LM loss on the windows' own next tokens) or "kl" (the mean
              per-token KL divergence of the sparse model's next-token distribution from the
              dense model's, the dense one computed once before the search).
    """

    method: ClassVar[str] = "rsparse"
    alpha: float = 0.9
    score: str = "wina"
    lowrank: str = "svd"
    recalibrate: bool = True
    shared_selection: bool = False
    role_coefficients: tuple[tuple[str, float], ...] = ()
    allocation: str = "uniform"
    search_over: str = "alpha"
    search_generations: int = 6
    search_population: int = 8
    search_windows: int = 2
    search_seed: int = 0
    search_fitness: str = "loss"
    greedy_step: float = 0.05
    greedy_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_greedy(self)
        if not isinstance(self.alpha, (int, float)) or not 0.0 < self.alpha <= 1.0:
            raise ActSparseError(f"alpha must be in (0, 1], got {self.alpha!r}")
        _check_choice("score", self.score, RSPARSE_SCORES)
        _check_choice("lowrank", self.lowrank, RSPARSE_LOWRANK)
        _check_choice("allocation", self.allocation, RSPARSE_ALLOCATIONS)
        _check_choice("search_over", self.search_over, RSPARSE_SEARCH_OVER)
        _check_choice("search_fitness", self.search_fitness, RSPARSE_SEARCH_FITNESS)
        object.__setattr__(self, "role_coefficients", _role_coefficients(self.role_coefficients))
        for what in ("search_generations", "search_population", "search_windows"):
            if not isinstance(getattr(self, what), int) or getattr(self, what) < 1:
                raise ActSparseError(f"{what} must be an integer >= 1, got {getattr(self, what)!r}")


@dataclass(frozen=True)
class RSparseKlConfig(RSparseConfig):
    """R-Sparse's allocation, then a calibration-time KL tune: the best training-free recipe on
    SmolLM2-135M at 40% (issue 28; BENCHMARKS.md "Accuracy beyond the papers").

    The R-Sparse part defaults to what searched best there: the greedy per-linear allocation from
    alpha 1 (no low-rank path), then the search over per-layer alpha and sparsity, which buys low
    rank only where it brings the sparse model nearer the dense one. WINA scores and the search
    on KL to the dense model (rather than magnitude scores and the LM loss) were chosen over six
    search seeds on text neither tuned nor evaluated on (BENCHMARKS_HISTORY.md, session 21).
    Masking leaves each layer's output
    biased in ways no per-linear fit removes (a least-squares refit of each linear to its dense
    output was worse than TEAL); what helps is to move every weight so that the sparse model's
    next-token distribution matches the dense one's, with the masks' state held fixed:

    statistics_windows: the R-Sparse part (thresholds, greedy allocation, search) calibrates on
              the first this many calibration windows; the tune takes all of them (its cost grows
              with its steps, not with the windows), so `--calib-samples 200` gives it fresh text
              every step while the statistics passes stay short.
    kl_steps: Adam steps minimising KL(dense || sparse) over the calibration windows, one window a
              step (cycled when there are fewer windows than steps); 0: R-Sparse alone. The dense
              model is the same model with its sparsity off and the update not applied, so no
              second copy is held. The time grows with the steps; at 200, SmolLM2's sparsify
              takes 11-17 minutes on 2 CPU cores with AVX-512 BF16 (26-42 on AVX2-only ones);
              at 150 the slower AVX-512 machine took 14.8 minutes, and WikiText-2 was 0.4 worse.
              At 50% more steps on as many windows lowered every perplexity measured (800:
              WikiText-2 35.22 / 34.71 against 35.65 / 35.81 at two search seeds on an H100); at
              40% 400 did not (BENCHMARKS.md).
    kl_lr:    Adam's starting learning rate. With the cosine schedule, of 4e-5, 8e-5, 1.2e-4, 1.6e-4
              and 3.2e-4 on SmolLM2 at 40%, 8e-5 and 1.2e-4 gave the lowest perplexity on held-out
              C4-train text (not the evaluation texts; BENCHMARKS_HISTORY.md). BENCHMARKS.md's
              rank-64 runs at 8B took 3e-4 at a constant rate (one rate tried, not swept).
    kl_rank:  0 tunes a full update of every decoder linear (fp32, with Adam's two moments: 16
              bytes a weight, refused before any work where it cannot fit); r > 0 tunes a rank-r
              update ``W + B A`` of each (what fits a 7-8B model on one GPU). The update is folded
              into the weights at the end, so the saved model is an ordinary R-Sparse model.
    kl_autocast: true runs the tune's forwards and backward under bf16 autocast (the update and
              Adam's state stay fp32), false in fp32; unset (the default), bf16 where the device
              multiplies bf16 in hardware (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or AMX:
              on 2 such cores a step costs ~0.65x fp32's, BENCHMARKS.md) and fp32 elsewhere (on
              2 AVX2-only cores a bf16 step took 112 s, an fp32 one 7.5 s). The recipe records
              which ran.
    kl_schedule: "cosine" decays Adam's rate from kl_lr along a half cosine towards zero at the
              last step (a higher start, then small last steps: better on every text than the best
              constant rate, 4e-5); "constant" keeps it at kl_lr.
    kl_warmup: the rate rises linearly to kl_lr over this many first steps (then the schedule
              runs over the rest); 0: it starts at kl_lr.
    kl_weight_decay: AdamW's decoupled decay of the update towards zero, i.e. of the tuned weights
              towards the method's (each step shrinks the update by rate x decay, so it acts at
              values near 1 / (kl_lr x kl_steps)); 0: plain Adam.
    """

    method: ClassVar[str] = "rsparse-kl"
    tunes_weights: ClassVar[bool] = True
    alpha: float = 1.0
    allocation: str = "greedy+search"
    search_over: str = "alpha+sparsity"
    search_fitness: str = "kl"
    greedy_step: float = 0.1
    greedy_tokens: int = 512
    statistics_windows: int = 16
    kl_steps: int = 200
    kl_lr: float = 1.2e-4
    kl_rank: int = 0
    kl_autocast: bool | None = None
    kl_schedule: str = "cosine"
    kl_warmup: int = 0
    kl_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for what in ("kl_steps", "kl_rank", "kl_warmup"):
            if not isinstance(getattr(self, what), int) or getattr(self, what) < 0:
                raise ActSparseError(f"{what} must be an integer >= 0, got {getattr(self, what)!r}")
        if not isinstance(self.statistics_windows, int) or self.statistics_windows < 1:
            raise ActSparseError(f"statistics_windows must be an integer >= 1, got {self.statistics_windows!r}")
        if not isinstance(self.kl_lr, (int, float)) or not 0.0 < self.kl_lr < 1.0:
            raise ActSparseError(f"kl_lr must be in (0, 1), got {self.kl_lr!r}")
        _check_choice("kl_schedule", self.kl_schedule, KL_SCHEDULES)
        if self.kl_steps and self.kl_warmup >= self.kl_steps:
            raise ActSparseError(f"kl_warmup must be below kl_steps ({self.kl_steps}), got {self.kl_warmup}")
        if not isinstance(self.kl_weight_decay, (int, float)) or not self.kl_weight_decay >= 0.0:
            raise ActSparseError(f"kl_weight_decay must be a number >= 0, got {self.kl_weight_decay!r}")


@dataclass(frozen=True)
class LaRoSAConfig(MethodConfig):
    """LaRoSA: the attention input and the MLP input are rotated into the eigenbasis Q of their
    calibration covariance (folded into the weights, ``W' = W Q``; the rotation ``x' = Q^T x`` runs
    once per input, inside the preceding norm), then top-K per token on |x'|.

    sparsity: target of sparsity.model. Rotated inputs (q/k/v, gate/up) get `rotated_coefficient`
              * s and the others (o, down) `unrotated_coefficient` * s (the paper's 0.8 / 1.2),
              rescaled so the parameter-weighted mean is s.
    damping:  added to the covariance's diagonal, as a fraction of its mean diagonal.
    score:    "magnitude" (|x'_i|, the paper's) or "wina" (|x'_i| * ||W'[:, i]||_2 on the folded
              weights, so each consumer of a shared rotated input keeps its own coordinates).
    head_rotation: also rotate o_proj's input, head by head, into the eigenbasis of each value
              head's output (folded into v_proj and o_proj: nothing runs at inference); o then
              counts as a rotated input for the coefficients.
    unrotated_selection: how the linears that read an unrotated input (o, down; down only with
              head_rotation) select: "threshold" (default, beyond the paper), "topk" (the paper's),
              or None (as `selection`). "threshold" keeps top-K where the rotation packs the energy
              and gives o/down TEAL's calibrated thresholds, so their per-token budget follows the
              token: on SmolLM2 more accurate than top-K everywhere at 40% and 50% (BENCHMARKS.md),
              and at decode two selections a layer fewer.
    recalibrate: for thresholds, calibrate on the scores of the model already sparsified by
              top-K at the targets (False: of the dense rotated model).
    rotation: "per-layer" (the paper's: each norm output in its own basis, one d x d rotation per
              input at inference, reported as `rotation_reads`) or "residual": one basis for the
              whole residual stream, from the pooled second moment of the normalised layer inputs,
              absorbed into the embedding, every weight and the LM head (the norms' gains are folded
              into their consumers), so no rotation runs at inference. Pre-norm decoders only (not
              Gemma2/Gemma3, whose post-norms sit between a branch and the stream).
    allocation: "coefficients" (the paper's: the two coefficients above) or "greedy": TEAL's
              per-block greedy search over per-linear sparsity (see TealConfig) on the rotated
              model, each step taken by top-K; the coefficients are then not used.
    """

    method: ClassVar[str] = "larosa"
    selection: str = "topk"
    unrotated_selection: str | None = "threshold"
    score: str = "magnitude"
    head_rotation: bool = False
    recalibrate: bool = True
    rotated_coefficient: float = 0.8
    unrotated_coefficient: float = 1.2
    damping: float = 0.01
    rotation: str = "per-layer"
    allocation: str = "coefficients"
    greedy_step: float = 0.05
    greedy_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("rotation", self.rotation, LAROSA_ROTATIONS)
        if self.unrotated_selection is not None:
            _check_choice("unrotated_selection", self.unrotated_selection, SELECTIONS)
        _check_choice("allocation", self.allocation, LAROSA_ALLOCATIONS)
        _check_greedy(self)
        for what in ("rotated_coefficient", "unrotated_coefficient"):
            if not isinstance(getattr(self, what), (int, float)) or not getattr(self, what) > 0:
                raise ActSparseError(f"{what} must be > 0, got {getattr(self, what)!r}")
        if not isinstance(self.damping, (int, float)) or not 0.0 <= self.damping < 1.0:
            raise ActSparseError(f"damping must be in [0, 1), got {self.damping!r}")
        _check_choice("score", self.score, RSPARSE_SCORES)


LINEAR_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")


def _role_coefficients(pairs) -> tuple[tuple[str, float], ...]:
    out = tuple((str(role), float(c)) for role, c in (pairs.items() if isinstance(pairs, dict) else pairs))
    for role, c in out:
        _check_choice("role", role, LINEAR_ROLES)
        if not c > 0:
            raise ActSparseError(f"role coefficient for {role} must be > 0, got {c}")
    return out
