"""ProSparse training: ReLU-fication, the progressive L1 schedule, a plain loop and a HF Trainer
callback, distributed through torchrun + DDP."""
from .data import ShardedBatches, pack_texts
from .distributed import Dist, setup
from .hf import ProSparseCallback
from .loop import TrainArgs, finished, train
from .penalty import IntermediateL1
from .prosparse import train_prosparse
from .schedule import L1Schedule
from .student import export_student, load_student, student_config, student_model

__all__ = [
    "Dist",
    "IntermediateL1",
    "L1Schedule",
    "ProSparseCallback",
    "ShardedBatches",
    "TrainArgs",
    "export_student",
    "finished",
    "load_student",
    "pack_texts",
    "setup",
    "student_config",
    "student_model",
    "train",
    "train_prosparse",
]
