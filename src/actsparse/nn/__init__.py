"""The modules that run: one input-sparse linear (`linear.py`) and one gated MLP (`mlp.py`), for
every method, on every device, and a dense linear for the LM head (`dense.py`); they own their
packed weights (`packing.py`) and call the `actsparse::` ops (`actsparse.kernels.ops`) when their
kernels are on."""
from ..kernels.ops import topk_mask
from .baseline import dense_baseline
from .dense import DenseLinear
from .linear import MODES, SparseLinear, select_mask
from .meter import ReadMeter
from .mlp import SparseGatedMLP, output_sparse_up

__all__ = ["DenseLinear", "MODES", "ReadMeter", "SparseGatedMLP", "SparseLinear", "dense_baseline", "output_sparse_up", "select_mask", "topk_mask"]
