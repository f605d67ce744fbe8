"""The `actsparse` quantization method of vLLM: config.json's `quantization_config` -> linear methods.

vLLM builds this config from the saved directory's ``quantization_config`` (`from_config`), then
hands it the model path (`maybe_update_config`), where the sparsity state is read and checked,
before any weight loads. Each linear with state gets an `ActSparseLinearMethod`; the others vLLM's
own unquantized method.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..errors import ActSparseError
from ..io import FORMAT_VERSION, QUANT_METHOD, STATE_FILE
from .linear_method import ActSparseLinearMethod
from .state import SparseState, read_state

MEASURE_ENV = "ACTSPARSE_VLLM_MEASURE"  # "1": count the zeros each linear reads (slow; see measure.py)


@register_quantization_config(QUANT_METHOD)
class ActSparseConfig(QuantizationConfig):
    def __init__(self, format_version: Any, method: Any, state: Any) -> None:
        super().__init__()
        if format_version != FORMAT_VERSION:
            raise ActSparseError(f"config.json: actsparse format version {format_version!r} is not supported "
                                 f"(this actsparse reads version {FORMAT_VERSION}; re-save it with this actsparse)")
        if state != STATE_FILE:
            raise ActSparseError(f"config.json: quantization_config's state is {state!r}, expected {STATE_FILE!r}")
        self.method = method
        self.state: SparseState | None = None
        self.act_name: str | None = None
        self.measure = os.environ.get(MEASURE_ENV) == "1"
        self._mapper = None  # vLLM's hf -> vllm module renames (`apply_vllm_mapper`); kept picklable
        self._by_vllm_name: tuple[dict, dict] | None = None  # (selections, gate masks) under vLLM's names

    def __repr__(self) -> str:
        return f"ActSparseConfig(method={self.method!r})"

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # plain torch and actsparse's own ops: no GPU generation needed

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # everything is in config.json's quantization_config and the state folder

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ActSparseConfig":
        return cls(config.get("format_version"), config.get("method"), config.get("state"))

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        """Read the state of the directory vLLM serves (a local actsparse directory only)."""
        directory = Path(model_name)
        if not directory.is_dir():
            raise ActSparseError(f"{model_name}: the actsparse vLLM plugin serves a local directory saved by "
                                 "actsparse.save, not a hub id (download it first)")
        self.state = read_state(directory)
        if self.state.method != self.method:
            raise ActSparseError(f"{directory / 'config.json'}: quantization_config names method {self.method!r} "
                                 f"but {STATE_FILE} holds {self.state.method!r}")
        self.act_name = _activation(hf_config) if self.state.gates else None

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._mapper = hf_to_vllm_mapper
        self._by_vllm_name = None

    def _rename(self, name: str) -> str:
        mapped = None if self._mapper is None else self._mapper.map_name(f"{name}.weight")
        return name if mapped is None else mapped.removesuffix(".weight")

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not isinstance(layer, LinearBase):
            return None
        if self.state is None:
            raise ActSparseError("the actsparse quantization config was used before its directory was read")
        members = self._members(prefix)
        selections = [self._selection(m) for m in members]
        parent = prefix.rpartition(".")[0]
        gate = self._gate(parent) if len(members) == 2 and prefix.endswith("gate_up_proj") else None
        zero_skip = prefix.endswith("down_proj") and self._gate(parent) is not None
        self._check_gate_placement(prefix, parent, gate)
        if gate is None and not zero_skip and all(s is None for s in selections):
            return UnquantizedLinearMethod()
        return ActSparseLinearMethod(members, selections, gate, self.act_name, zero_skip, self.measure)

    def _members(self, prefix: str) -> list[str]:
        """The Hugging Face linears a vLLM linear holds, in output order (q/k/v, gate/up)."""
        parent, _, leaf = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(leaf)
        return [f"{parent}.{p}" if parent else p for p in parts] if parts else [prefix]

    def _names(self) -> tuple[dict, dict]:
        if self._by_vllm_name is None:
            self._by_vllm_name = ({self._rename(k): v for k, v in self.state.linears.items()},
                                  {self._rename(k): v for k, v in self.state.gates.items()})
        return self._by_vllm_name

    def _selection(self, name: str):
        return self._names()[0].get(name)

    def _gate(self, mlp: str):
        return self._names()[1].get(mlp)

    def _check_gate_placement(self, prefix: str, parent: str, gate) -> None:
        """A gate mask is applied to the `up` half of a merged gate/up layer; another layout is refused."""
        if gate is None and self._gate(parent) is not None and prefix.endswith(("gate_proj", "up_proj")):
            raise ActSparseError(f"{parent}: a gate mask ({self.method}) needs vLLM's merged gate_up_proj; this model "
                                 f"builds {prefix} on its own, which the actsparse vLLM plugin does not mask")


def _activation(hf_config) -> str:
    name = getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)
    if not isinstance(name, str):
        raise ActSparseError("config.json: no hidden_act for the gate mask's activation")
    return name

