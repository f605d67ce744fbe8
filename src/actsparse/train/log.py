"""The training log: one CSV row per logged step."""
from __future__ import annotations

import csv
import os
from pathlib import Path


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a log written by `CsvLog`, every value as a float."""
    with Path(path).open(newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class CsvLog:
    """Appends rows to `path`; resuming at step s first drops the rows logged after s."""

    def __init__(self, path: str | os.PathLike, columns: list[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.columns = columns
        kept: list[dict] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)
