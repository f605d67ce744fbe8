"""ProSparse's L1 coefficient as a function of the optimizer step.

Stages, from a table of (end step T_i, lambda_i): stage 0 (t < T_0) has lambda 0 (the ReLU swap
alone); the warm-up stage (T_0 <= t < T_1) holds lambda_1; each later stage i ramps from
lambda_{i-1} to lambda_i along a half sine,
    eta = 0.5 * (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1),
    lambda = lambda_{i-1} + eta * (lambda_i - lambda_{i-1}),
and after the last stage lambda stays at its last value. The constant schedule (the paper's
ablation) keeps stage 0 and then holds the last lambda.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import ProSparseConfig
from ..errors import ActSparseError


@dataclass(frozen=True)
class L1Schedule:
    stages: tuple[tuple[int, float], ...]  # (end step, lambda) in this run's optimizer steps
    constant: bool = False

    @classmethod
    def from_config(cls, config: ProSparseConfig, total_steps: int) -> "L1Schedule":
        """The config's stage table with its end steps scaled so the last one is `total_steps`."""
        table = config.stage_table()
        if total_steps < len(table):
            raise ActSparseError(f"a {len(table)}-stage schedule needs at least {len(table)} steps, got {total_steps}")
        scale = total_steps / table[-1][0]
        stages = tuple((max(1, round(t * scale)), lam) for t, lam in table)
        return cls(stages=stages, constant=config.schedule == "constant")

    def lambda_at(self, step: int) -> float:
        """Lambda for the optimizer step `step` (0-based)."""
        ends = [t for t, _ in self.stages]
        lams = [lam for _, lam in self.stages]
        if step < ends[0]:
            return 0.0
        if self.constant:
            return lams[-1]
        if step < ends[1]:
            return lams[1]
        for i in range(2, len(ends)):
            if step < ends[i]:
                eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - ends[i - 1]) / (ends[i] - ends[i - 1])) + 1)
                return lams[i - 1] + eta * (lams[i] - lams[i - 1])
        return lams[-1]
