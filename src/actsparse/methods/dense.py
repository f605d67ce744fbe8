"""The dense baseline: modules swapped, nothing masked, so it runs the same code as every method."""
from __future__ import annotations

from ..config import DenseConfig
from . import register


@register(DenseConfig, calibrated=False)
def apply_dense(model, specs, config, calibration) -> dict:
    return {}
