"""One frozen, versioned configuration dataclass per method, validated on construction.

Every config serialises to JSON through `to_dict` and back through `config_from_dict`, which
dispatches on the ``method`` name; subclasses register themselves by defining ``method``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
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

    sparsity: float = 0.5
    selection: str = "threshold"
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, float], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.method:
            CONFIGS[cls.method] = cls

    def __post_init__(self) -> None:
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
    data = dict(data)
    name = data.pop("method", None)
    if name not in CONFIGS:
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
    if "overrides" in data:
        data["overrides"] = tuple(tuple(o) for o in data["overrides"])
    if "ignore" in data:
        data["ignore"] = tuple(data["ignore"])
    return cls(**data)


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


def _check_fraction(what: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ActSparseError(f"{what} must be in [0, 1), got {value!r}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ActSparseError(f"{what} must be one of {', '.join(choices)}, got {value!r}")


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
    """

    method: ClassVar[str] = "teal"
    allocation: str = "uniform"
    greedy_step: float = 0.05
    greedy_tokens: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        if not 0.0 < self.greedy_step <= 0.5:
            raise ActSparseError(f"greedy_step must be in (0, 0.5], got {self.greedy_step}")
        if self.greedy_tokens < 16:
            raise ActSparseError(f"greedy_tokens must be at least 16, got {self.greedy_tokens}")


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
