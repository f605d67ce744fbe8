"""Distillation terms against the frozen dense model: next-token KL and per-layer hidden states.

The hidden states are read by forward hooks on the decoder layers rather than through
transformers' `output_hidden_states`, whose output-capturing hooks read a context variable that
torch.compile cannot trace (every compiled layer would break in two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models import decoder_layers


class LayerOutputs:
    """Keeps each decoder layer's output hidden states of the forward passes since the last `pop`.

    One list per layer, each hook holding its own, rather than one shared list: under
    torch.compile a shared list's length is guarded on and every layer would be compiled again.
    """

    def __init__(self, model: nn.Module) -> None:
        layers = decoder_layers(model)[1]
        self._outputs: list[list[torch.Tensor]] = [[] for _ in layers]
        self._handles = [layer.register_forward_hook(self._hook(kept)) for layer, kept in zip(layers, self._outputs)]

    @staticmethod
    def _hook(kept: list[torch.Tensor]):
        def hook(module: nn.Module, args: tuple, output) -> None:
            kept.append(output[0] if isinstance(output, tuple) else output)

        return hook

    def pop(self) -> list[torch.Tensor]:
        """Every layer's output of the one forward pass since the last call, first layer first."""
        if any(len(kept) != 1 for kept in self._outputs):
            raise RuntimeError(f"expected one forward pass since the last pop, saw {[len(k) for k in self._outputs]} per layer")
        return [kept.pop() for kept in self._outputs]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for kept in self._outputs:
            kept.clear()


def lm_and_kl(logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token cross-entropy on `ids` (transformers' causal-LM loss for unpadded windows)
    and the mean over tokens of KL(teacher || student), both from one fp32 log-softmax of the
    student's logits: the vocabulary-wide tensors are the costliest part of a small model's step."""
    student = F.log_softmax(logits.float(), dim=-1)
    target = F.log_softmax(teacher_logits.float(), dim=-1)
    ce = -student[:, :-1].gather(-1, ids[:, 1:, None]).mean()
    kd = F.kl_div(student.flatten(0, -2), target.flatten(0, -2), log_target=True, reduction="batchmean")
    return ce, kd


def hidden_mse(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Mean over decoder layers of MSE(student, teacher) / mean(teacher**2), in fp32."""
    terms = [F.mse_loss(s.float(), t.float()) / t.float().square().mean() for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()
