"""`dense_baseline`: a sparsified model run dense for a block, its sparsity state set back after
(the dense side of a speed comparison on the same modules, the teacher of a KL tune)."""
from __future__ import annotations

import contextlib

from torch import nn

from .linear import SparseLinear
from .mlp import SparseGatedMLP


@contextlib.contextmanager
def dense_baseline(model: nn.Module):
    """Every actsparse module of a sparsified `model` dense for the block, through the modules' own
    setters; their sparsity state (thresholds, top-K, scales, low-rank factors) is set back after."""
    restore = []
    for module in model.modules():
        if isinstance(module, SparseLinear) and module.mode != "dense":
            args = (float(module.threshold), module.target, module.score_scale)
            if module.mode == "threshold":
                restore.append(lambda m=module, a=args: m.set_threshold(*a))
            else:
                restore.append(lambda m=module, k=module.k, a=args: m.set_topk(k, a[1], a[2]))
            module.set_dense()
        elif isinstance(module, SparseGatedMLP) and module.gate_mode != "dense":
            if module.gate_mode == "threshold":
                t, target = float(module.gate_threshold), module.gate_target
                restore.append(lambda m=module, t=t, target=target: m.set_gate_threshold(t, target))
            else:
                restore.append(lambda m=module, k=module.gate_k, target=module.gate_target: m.set_gate_topk(k, target))
            module.set_gate_dense()
    try:
        yield
    finally:
        for undo in restore:
            undo()
