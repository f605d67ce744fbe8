"""`ActSparseLinearMethod`: a vLLM linear (plain weights, as loaded by vLLM) run through a `LayerPlan`.

The weights are created and loaded exactly as vLLM's unquantized linears are (its weight loaders
place q/k/v and gate/up shards and tensor-parallel slices), then kept as they are: the sparse
product needs the plain weight, not vLLM's prepacked CPU GEMM. Decode batches (up to
`ops.MAX_BATCH` tokens) run through the `actsparse::` ops where actsparse has kernels for the
weights' device and dtype (`runtime.kernels_run`), prefill through the torch reference.
"""
from __future__ import annotations

from typing import Callable

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, RowParallelLinear, UnquantizedLinearMethod

from ..errors import ActSparseError
from ..kernels import load_kernels
from ..runtime import kernels_run
from .plan import LayerPlan, Meter
from .state import GateMask, Selection


class ActSparseLinearMethod(LinearMethodBase):
    def __init__(self, members: list[str], selections: list[Selection | None], gate: GateMask | None,
                 act_name: str | None, zero_skip: bool, measure: bool) -> None:
        self.members = members
        self.selections = selections
        self.gate = gate
        self.act_name = act_name
        self.zero_skip = zero_skip
        self.measure = measure
        self._weights = UnquantizedLinearMethod()

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if len(output_partition_sizes) != len(self.members):
            raise ActSparseError(f"{layer.prefix}: vLLM builds {len(output_partition_sizes)} output shards, the "
                                 f"actsparse state names {len(self.members)} ({', '.join(self.members)})")
        scaled = any(s is not None and s.scale is not None for s in self.selections)
        if scaled and isinstance(layer, RowParallelLinear) and layer.tp_size > 1:
            raise ActSparseError(f"{layer.prefix}: per-channel score scales (WINA) are not split across "
                                 f"tensor-parallel ranks; serve this directory with tensor_parallel_size=1")
        self._weights.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                     output_size, params_dtype, **extra_weight_attrs)
        layer.actsparse_plan = LayerPlan.build(output_partition_sizes, self.selections, self.gate,
                                               _activation(self.act_name) if self.gate else None, self.zero_skip)
        if self.measure:
            layer.actsparse_plan.meter = Meter()

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        weight = layer.weight
        kernels = kernels_run(weight.device, weight.dtype)
        if kernels:
            load_kernels(weight.device)
        layer.actsparse_plan.prepare(weight.detach(), kernels)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.actsparse_plan.forward(x, layer.weight, bias)


def _activation(name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Hugging Face activation of this name: the one actsparse's gate mask was calibrated on."""
    from transformers.activations import ACT2FN

    if name not in ACT2FN:
        raise ActSparseError(f"config.json: activation {name!r} is not one transformers knows")
    return ACT2FN[name]
