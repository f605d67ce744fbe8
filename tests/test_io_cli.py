"""Save/load and the command line, on tiny models saved to disk with an offline tokenizer."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import actsparse as asp
from actsparse.cli import main
from actsparse.compare import pareto_plot
from actsparse.errors import ActSparseError
from actsparse.evaluate import perplexity
from actsparse.io import load, save
from tiny import ARCHS, random_text, random_tokens, tiny_model, tiny_tokenizer

CALIB = random_tokens(6, 40, seed=3)
EVAL = random_tokens(3, 40, seed=4)


def logits(model):
    with torch.no_grad():
        return model(EVAL).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("config", [asp.WinaConfig(sparsity=0.5), asp.TealConfig(sparsity=0.4, selection="topk"),
                                    asp.CatsConfig(sparsity=0.5)], ids=lambda c: c.method + "-" + c.selection)
def test_save_load_gives_identical_logits(tmp_path, arch, config):
    model = asp.sparsify_(tiny_model(arch), config, CALIB)
    save(model, tmp_path / "out", tiny_tokenizer())
    loaded, tokenizer = load(tmp_path / "out")
    assert torch.equal(logits(loaded), logits(model))
    assert loaded.actsparse_config == config
    assert tokenizer is not None
    assert not list(tmp_path.glob(".out.tmp*")), "no temporary directory left behind"


@pytest.fixture()
def saved(tmp_path):
    model = asp.sparsify_(tiny_model("llama"), asp.TealConfig(sparsity=0.5), CALIB)
    return save(model, tmp_path / "saved")


@pytest.mark.parametrize("missing", ["actsparse/recipe.json", "actsparse/state.safetensors", "model.safetensors", "config.json"])
def test_load_names_the_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(ActSparseError, match=missing.replace(".", r"\.")):
        load(saved)


def test_load_refuses_another_format_version(saved):
    meta = json.loads((saved / "actsparse/recipe.json").read_text())
    meta["format_version"] = 99
    (saved / "actsparse/recipe.json").write_text(json.dumps(meta))
    with pytest.raises(ActSparseError, match="recipe.json.*version 99"):
        load(saved)


def test_load_names_a_shape_mismatch(saved):
    state = load_file(str(saved / "actsparse/state.safetensors"))
    key = next(k for k in state if k.endswith("threshold"))
    state[key] = torch.zeros(3)
    save_file(state, str(saved / "actsparse/state.safetensors"))
    with pytest.raises(ActSparseError, match=f"state.safetensors.*{key}"):
        load(saved)


def test_save_refuses_a_non_empty_directory(saved):
    model = asp.sparsify_(tiny_model("llama"), asp.DenseConfig())
    with pytest.raises(ActSparseError, match="not empty"):
        save(model, saved)


# -- command line ------------------------------------------------------------------------------
@pytest.fixture()
def texts(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(800, seed=1))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("\n".join(json.dumps({"text": random_text(300, seed=s)}) for s in range(2, 5)))
    return calib, evaluation


def test_cli_sparsify_then_eval_writes_the_json_contract(tmp_path, model_dir, texts, capsys):
    calib, evaluation = texts
    out = tmp_path / "sparse"
    args = [str(model_dir), "--method", "teal", "--sparsity", "0.5", "--calib", str(calib), "--calib-samples", "4",
            "--calib-seq-len", "64"]
    assert main(["sparsify", *args, "-o", str(out)]) == 0
    result_path = tmp_path / "r.json"
    assert main(["eval", str(out), "--ppl", str(evaluation), "--seq-len", "64", "--json", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    assert result["ppl"] > 1 and result["ppl_windows"] == 900 // 64 and result["seq_len"] == 64
    assert result["sparsity"]["model"] == pytest.approx(0.5, abs=0.03)
    assert len(result["sparsity"]["per_layer"]) == 2 and result["tasks"] == {}
    assert "perplexity" in capsys.readouterr().out


def test_cli_compare_writes_table_json_and_plot(tmp_path, model_dir, texts):
    calib, evaluation = texts
    out = tmp_path / "cmp"
    assert main(["compare", str(model_dir), "--methods", "teal,cats,wina", "--sparsity", "0.25,0.5", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-seq-len", "64", "--ppl", str(evaluation), "--seq-len", "64",
                 "--windows", "4", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["dense"] + ["teal"] * 2 + ["cats"] * 2 + ["wina"] * 2
    assert "| teal | 0.50 |" in (out / "results.md").read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_compare_saved_rows_equal_eval_of_their_directories(tmp_path, model_dir, texts):
    calib, evaluation = texts
    window = ["--ppl", str(evaluation), "--seq-len", "64", "--windows", "4"]
    a, b = tmp_path / "teal-a", tmp_path / "teal-b"
    assert main(["sparsify", str(model_dir), "--method", "teal", "--sparsity", "0.5", "--calib", str(calib),
                 "--calib-samples", "4", "--calib-seq-len", "64", "-o", str(a)]) == 0
    save(asp.sparsify_(tiny_model("llama"), asp.TealConfig(sparsity=0.3), CALIB), b)  # no tokenizer: MODEL's is used
    out = tmp_path / "cmp"
    assert main(["compare", str(model_dir), "--saved", f"{a},{b}", *window, "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["method"], r["source"], r["target"]) for r in rows] == [("dense", None, 0.0), ("teal", str(a), 0.5),
                                                                       ("teal", str(b), 0.3)]
    expected = []
    for directory in (model_dir, a):
        assert main(["eval", str(directory), *window, "--json", str(tmp_path / "r.json")]) == 0
        expected.append(json.loads((tmp_path / "r.json").read_text()))
    expected.append(perplexity(load(b)[0], tiny_tokenizer(), evaluation, 64, 4))
    for row, want in zip(rows, expected):
        assert row["ppl"] == pytest.approx(want["ppl"], rel=1e-6)
        assert row["sparsity_model"] == pytest.approx(want["sparsity"]["model"], rel=1e-6)
        assert row["sparsity_mlp"] == pytest.approx(want["sparsity"]["mlp"], rel=1e-6)
    assert rows[1]["sparsity_model"] > rows[2]["sparsity_model"] > 0.2
    table = (out / "results.md").read_text()
    assert f"| teal ({a}) | 0.50 | model |" in table and f"| teal ({b}) | 0.30 | model |" in table
    assert set(results["ppl_5pct_sparsity"]) == {f"teal ({a})", f"teal ({b})"}


@pytest.mark.parametrize("case,message", [("missing", "no such directory"), ("incomplete", "actsparse/recipe.json: missing"),
                                          ("other-tokenizer", "its tokenizer gives other token ids")])
def test_cli_compare_refuses_a_bad_saved_directory_before_loading_the_model(tmp_path, model_dir, texts, case,
                                                                             message, monkeypatch, capsys):
    _, evaluation = texts
    dense = asp.sparsify_(tiny_model("llama"), asp.DenseConfig())
    good = save(dense, tmp_path / "good", tiny_tokenizer())
    bad = {"missing": tmp_path / "nope", "incomplete": model_dir,
           "other-tokenizer": save(dense, tmp_path / "shifted", tiny_tokenizer(shift=1))}[case]

    def load_model(*args, **kwargs):
        raise AssertionError("MODEL was loaded before the saved directories were checked")

    monkeypatch.setattr("actsparse.commands.compare.load_model", load_model)
    out = tmp_path / "cmp"
    assert main(["compare", str(model_dir), "--methods", "teal", "--sparsity", "0.5", "--saved", f"{good},{bad}",
                 "--ppl", str(evaluation), "--seq-len", "64", "--windows", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"actsparse: error: {bad}") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("with_saved", [False, True])
def test_cli_compare_needs_a_tokenizer_for_model(tmp_path, texts, with_saved, capsys):
    _, evaluation = texts
    dense = asp.sparsify_(tiny_model("llama"), asp.DenseConfig())
    bare = save(dense, tmp_path / "bare")  # no tokenizer
    rows = ["--saved", str(save(dense, tmp_path / "good", tiny_tokenizer()))] if with_saved else ["--methods", "dense",
                                                                                               "--sparsity", "0.5"]
    out = tmp_path / "cmp"
    assert main(["compare", str(bare), *rows, "--ppl", str(evaluation), "--seq-len", "64", "--windows", "4",
                 "--out", str(out)]) == 2
    assert f"{bare}: no tokenizer saved with the model" in capsys.readouterr().err
    assert not out.exists()


def test_pareto_plot_gives_each_saved_model_its_own_point(tmp_path, monkeypatch):
    import matplotlib.figure

    lines = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: lines.update(
        {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}))
    rows = [{"method": m, "source": src, "sparsity_model": s, "ppl": ppl} for m, src, s, ppl in [
        ("dense", None, 0.0, 10.0), ("teal", None, 0.5, 12.0), ("teal", None, 0.25, 11.0),
        ("teal", "runs/a", 0.4, 13.0), ("teal", "runs/b", 0.6, 14.0)]]
    pareto_plot(rows, tmp_path / "p.png")
    assert lines["teal"] == [[0.0, 10.0], [0.25, 11.0], [0.5, 12.0]]
    assert lines["teal (runs/a)"] == [[0.4, 13.0]] and lines["teal (runs/b)"] == [[0.6, 14.0]]


def test_cli_generate_prints_the_prompt_and_a_continuation(model_dir, capsys):
    assert main(["generate", str(model_dir), "w1 w2 w3", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("w1 w2 w3") and out[len("w1 w2 w3"):].count("w") == 5


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sparsify", "{model}", "--method", "teal", "--sparsity", "1.5", "-o", "{out}"], "sparsity must be in"),
        (["sparsify", "{model}", "--method", "magic", "--sparsity", "0.5", "-o", "{out}"], "unknown method 'magic'"),
        (["sparsify", "{model}", "--method", "teal", "--sparsity", "0.5", "--calib", "{tmp}/nope.jsonl", "-o", "{out}"], "nope.jsonl: no such file"),
        (["sparsify", "{model}", "--method", "teal", "--sparsity", "0.5", "--calib", "{tmp}/empty.txt", "-o", "{out}"], "holds no text"),
        (["sparsify", "{model}", "--method", "teal", "--sparsity", "0.5", "--calib", "{tmp}/short.txt", "-o", "{out}"], "shorter than one window"),
        (["sparsify", "{tmp}/no-model", "--method", "teal", "--sparsity", "0.5", "-o", "{out}"], "no-model: no such file or directory"),
        (["eval", "{model}"], "nothing to evaluate"),
        (["compare", "{model}", "--methods", "teal", "--sparsity", "0.5,x", "--out", "{out}"], "'x' is not a number"),
        (["compare", "{model}", "--out", "{out}"], "nothing to compare: give --methods with --sparsity, and/or --saved"),
        (["compare", "{model}", "--methods", "teal", "--out", "{out}"], "give --methods and --sparsity together"),
        (["generate", "{model}", "  "], "prompt is empty"),
        (["generate", "{model}", "w1", "--backend", "kernels", "--dtype", "fp64"], "unknown dtype 'fp64'"),
        (["bench", "{model}", "--backend", "kernels", "--dtype", "int8"], "unknown dtype 'int8'"),
    ],
)
def test_cli_bad_input_is_one_line_and_leaves_nothing(tmp_path, model_dir, argv, message, capsys):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("w1 w2 w3")
    out = tmp_path / "out"
    argv = [a.format(model=model_dir, out=out, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower() or "Traceback" in line]
    assert errors == [err[-1]] and err[-1].startswith("actsparse: error:") and message in err[-1], err
    assert not out.exists()
