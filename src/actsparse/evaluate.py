"""Perplexity on non-overlapping windows, with the sparsity measured on the same tokens.

Convention: the text is taken as it is (a .raw/.txt file is read whole; JSONL documents are
joined by blank lines), tokenized once without special tokens and cut into non-overlapping
windows of `seq_len` tokens (BOS + seq_len-1 tokens for models that expect a BOS, e.g. Gemma).
Each window predicts its seq_len-1 next tokens; ppl = exp(total NLL / predicted tokens).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import read_texts, token_windows, tokenize_texts, wants_bos
from .errors import ActSparseError
from .measure import measure_sparsity
from .models import layer_specs
from .nn import SparseGatedMLP


def eval_windows(tokenizer, source: Any, seq_len: int, windows: int | None) -> torch.Tensor:
    if source == "wikitext2":
        texts = _hub_wikitext2()
    else:
        texts = read_texts(source)
    bos = tokenizer.bos_token_id if wants_bos(tokenizer) else None
    max_tokens = None if windows is None else windows * seq_len
    ids = tokenize_texts(tokenizer, texts, max_tokens=max_tokens)
    return token_windows(ids, seq_len, windows, bos, what=f"evaluation text {source}")


def _hub_wikitext2() -> list[str]:
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
    except Exception as e:  # offline or no datasets: say what to pass instead
        raise ActSparseError(
            f"could not fetch wikitext2 from the hub ({type(e).__name__}); pass the local file, e.g. --ppl ../shared/data/wikitext2/wiki.test.raw"
        ) from None
    return ["".join(rows)]  # the rows keep their newlines: this is the raw file's text


@torch.no_grad()
def perplexity(model, tokenizer, source: Any, seq_len: int = 512, windows: int | None = None, progress: bool = True) -> dict:
    """{"ppl", "ppl_windows", "seq_len", "tokens", "sparsity"} on the first `windows` windows."""
    batches = eval_windows(tokenizer, source, seq_len, windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    measured = _is_swapped(model)
    meter_ctx = measure_sparsity(model) if measured else contextlib.nullcontext()
    with meter_ctx as meter:
        for window in tqdm(batches, desc="perplexity", unit="win", disable=not progress, leave=False):
            ids = window[None].to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
        report = meter.report().to_dict() if measured else None
    ppl = math.exp(nll / count)
    if not math.isfinite(ppl):
        raise ActSparseError(f"perplexity is not finite ({ppl}); the model's outputs overflowed")
    return {"ppl": ppl, "ppl_windows": len(batches), "seq_len": seq_len, "tokens": count, "sparsity": report}


def _is_swapped(model) -> bool:
    return all(isinstance(spec.mlp, SparseGatedMLP) for spec in layer_specs(model))


def ppl_p_sparsity(points: list[tuple[float, float]], dense_ppl: float, p: float = 1.0) -> float:
    """Sparsing Law's PPL-p% sparsity: the highest measured sparsity whose perplexity stays within
    p% of dense, from (sparsity, ppl) points of one method (0 when none qualifies)."""
    ok = [s for s, ppl in points if ppl <= dense_ppl * (1 + p / 100)]
    return max(ok, default=0.0)
