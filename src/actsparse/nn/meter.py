"""Weight reads per token of one module, against the dense count (`actsparse.measure`)."""
from __future__ import annotations


class ReadMeter:
    """Counts, for one module, the weight reads a token needs against the dense count."""

    def __init__(self, dense_reads_per_token: int) -> None:
        self.dense_reads_per_token = dense_reads_per_token
        self.tokens = 0
        self.reads = 0.0
        self.zeros = 0  # zero entries of the measured activation (MLP intermediate)
        self.entries = 0

    def add(self, tokens: int, reads: float) -> None:
        self.tokens += tokens
        self.reads += float(reads)

    def add_zeros(self, zeros: int, entries: int) -> None:
        self.zeros += int(zeros)
        self.entries += int(entries)

    @property
    def sparsity(self) -> float:
        if self.tokens == 0:
            return 0.0
        return 1.0 - self.reads / (self.tokens * self.dense_reads_per_token)
