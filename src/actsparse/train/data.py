"""Training text packed into fixed-length token windows, and their order per step and rank.

Documents are joined by blank lines and tokenized without special tokens (the convention of
`actsparse.evaluate`), then cut into non-overlapping windows (BOS-led for models that want one).
Every epoch visits the windows in a permutation seeded by (seed, epoch); global micro-batch k
takes the k-th block of `batch_size * world_size` windows and rank r its r-th slice, so each rank
sees its own shard and a resumed run continues exactly where the checkpoint stopped.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data import read_texts, token_windows, wants_bos
from ..errors import ActSparseError

TOKENIZE_BATCH = 256  # documents per tokenizer call (a fast tokenizer spreads a batch over cores)


def pack_texts(tokenizer, sources: Sequence[Any], seq_len: int, field: str = "text") -> torch.Tensor:
    """Windows [n, seq_len] of token ids from every source `actsparse.data.read_texts` accepts."""
    texts = [t for source in sources for t in read_texts(source, field)]
    pieces = [t if i == 0 else "\n\n" + t for i, t in enumerate(texts)]
    ids: list[int] = []
    for start in range(0, len(pieces), TOKENIZE_BATCH):
        for row in tokenizer(pieces[start : start + TOKENIZE_BATCH], add_special_tokens=False).input_ids:
            ids.extend(row)
    bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    names = ", ".join(str(s) for s in sources)
    return token_windows(torch.tensor(ids, dtype=torch.long), seq_len, None, bos, what=f"training text {names}")


class ShardedBatches:
    """Micro-batches of windows for one rank: `get(k)` is global micro-batch k's slice."""

    def __init__(self, windows: torch.Tensor, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.windows = windows
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.per_epoch = windows.shape[0] // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ActSparseError(
                f"the training text gives {windows.shape[0]} windows, fewer than one global batch of "
                f"{batch_size * world_size} ({batch_size} per rank x {world_size} ranks); give more text or a smaller --batch-size"
            )
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    def indices(self, k: int) -> torch.Tensor:
        epoch, j = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = torch.randperm(self.windows.shape[0], generator=g)
            self._epoch = epoch
        start = (j * self.world_size + self.rank) * self.batch_size
        return self._order[start : start + self.batch_size]

    def get(self, k: int) -> torch.Tensor:
        return self.windows[self.indices(k)]
