"""ProSparse as a Hugging Face `Trainer` callback.

    relufy_(model)  # actsparse.methods.prosparse (with config.train_threshold > 0, FATReLU at it while training)
    trainer = Trainer(model=model, args=TrainingArguments(max_steps=N, ...), train_dataset=...,
                      callbacks=[ProSparseCallback(ProSparseConfig(), log_path="out/train_log.csv")])
    trainer.train(); sparsify_(model, config)  # FATReLU for inference

A forward hook on the model adds lambda(global step) * L1 to the `loss` its output carries, which
is the loss the Trainer optimises. The Trainer rescales that loss afterwards, so the hook
pre-divides the penalty to leave it the mean over micro-batches and ranks: when the Trainer
normalises by the items of the whole accumulated batch (it passes `num_items_in_batch`), it
neither divides by the accumulation steps nor averages over ranks, and multiplies by the
world size when averaging tokens across devices.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
from transformers import TrainerCallback

from ..config import ProSparseConfig
from ..methods.prosparse import relufy_, set_fatrelu
from .log import CsvLog
from .penalty import IntermediateL1
from .schedule import L1Schedule


class ProSparseCallback(TrainerCallback):
    def __init__(self, config: ProSparseConfig, log_path: str | os.PathLike | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.history: list[dict] = []
        self.lam = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.config.train_threshold > 0:
            set_fatrelu(relufy_(model), self.config, self.config.train_threshold)
        self.schedule = L1Schedule.from_config(self.config, state.max_steps)
        self.penalty = IntermediateL1(model, self.config.l1_reduce)
        averaged_over_devices = args.average_tokens_across_devices and args.world_size > 1
        self._item_scale = 1.0 / (args.gradient_accumulation_steps * (args.world_size if averaged_over_devices else 1))
        self._l1 = torch.zeros(2, dtype=torch.float64, device=next(model.parameters()).device)
        self._hook = model.register_forward_hook(self._add_penalty, with_kwargs=True)
        self.lam = self.schedule.lambda_at(state.global_step)
        self._log = None
        if self.log_path is not None and state.is_world_process_zero:
            columns = ["step", "lambda", "l1", "sparsity"] + [f"sparsity_{i}" for i in range(self.penalty.layers)]
            self._log = CsvLog(self.log_path, columns)

    def on_step_begin(self, args, state, control, **kwargs):
        self.lam = self.schedule.lambda_at(state.global_step)

    def _add_penalty(self, module, args, kwargs, output):
        if not module.training or getattr(output, "loss", None) is None:
            return None
        l1 = self.penalty.pop_term()
        scale = self._item_scale if kwargs.get("num_items_in_batch") is not None else 1.0
        output.loss = output.loss + self.lam * scale * l1
        self._l1 += torch.stack([l1.detach().double(), torch.ones_like(l1, dtype=torch.float64)])
        return output

    def on_log(self, args, state, control, logs=None, **kwargs):
        zeros, entries = self.penalty.pop_sparsity()
        reduced = torch.cat([self._l1, zeros, entries])
        if torch_dist.is_initialized():
            torch_dist.all_reduce(reduced)
        self._l1.zero_()
        n = self.penalty.layers
        l1_sum, count = reduced[:2].tolist()
        if count == 0:  # the end-of-training summary log: no step since the last row
            return
        zeros, entries = reduced[2 : 2 + n], reduced[2 + n :]
        row = {"step": state.global_step, "lambda": self.lam, "l1": l1_sum / count,
               "sparsity": (zeros.sum() / entries.sum()).item()}
        row.update({f"sparsity_{i}": v for i, v in enumerate((zeros / entries).tolist())})
        self.history.append(row)
        if self._log is not None:
            self._log.write(row)
        if logs is not None:
            logs.update({"l1": row["l1"], "l1_lambda": self.lam, "mlp_sparsity": row["sparsity"]})

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()
        self.penalty.remove()
