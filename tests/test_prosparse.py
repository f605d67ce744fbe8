"""ProSparse on tiny models: config, activation swap, FATReLU, the L1 schedule and penalty, the
training loop (sparsity rises, loss finite, resume gives the same next step) and the HF callback."""
from __future__ import annotations

import copy
import csv
import dataclasses
import math

import pytest
import torch
from torch._dynamo.utils import counters

import actsparse as asp
from actsparse.errors import ActSparseError
from actsparse.measure import measure_sparsity
from actsparse.methods.prosparse import relufy_
from actsparse.models import layer_specs
from actsparse.train import IntermediateL1, L1Schedule, ShardedBatches, TrainArgs, train, train_prosparse
from actsparse.train.distill import LayerOutputs, lm_and_kl
from actsparse.train.loop import _losses, finished
from tiny import ARCHS, random_tokens, tiny_model

EVAL = random_tokens(4, 32, seed=4)
TRAIN = random_tokens(64, 32, seed=5)


def logits(model, tokens=EVAL):
    with torch.no_grad():
        return model(tokens).logits


def mlp_sparsity(model, tokens=EVAL):
    with measure_sparsity(model) as meter, torch.no_grad():
        model(tokens)
    return meter.report().mlp


# -- config ------------------------------------------------------------------------------


def test_config_round_trips_and_rejects_bad_values():
    config = asp.ProSparseConfig(threshold=0.02, train_threshold=0.01, schedule="constant", preset="1b", peak_lambda=0.3,
                                 l1_reduce="mean")
    assert asp.config_from_dict(config.to_dict()) == config
    custom = asp.ProSparseConfig(stages=((1, 0), (3, 0.5)))
    assert asp.config_from_dict(custom.to_dict()) == custom
    assert asp.ProSparseConfig.targets == "mlp"
    for bad in (dict(sparsity=0.5), dict(threshold=-1), dict(schedule="cosine"), dict(preset="13b"),
                dict(l1_reduce="max"), dict(peak_lambda=0), dict(train_threshold=-0.1), dict(stages=((5, 0.0), (3, 0.1))),
                dict(stages=((5, 0.1), (6, 0.1))), dict(selection="topk")):
        with pytest.raises(ActSparseError):
            asp.ProSparseConfig(**bad)


# -- activation swap and FATReLU -----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fatrelu_at_zero_is_relu_and_a_threshold_adds_zeros(arch):
    relu = tiny_model(arch)
    relufy_(relu)
    assert all(getattr(relu.config, f, "relu") == "relu" for f in ("hidden_act", "hidden_activation"))
    assert all(isinstance(spec.mlp.act_fn, torch.nn.ReLU) for spec in layer_specs(relu))
    reference = logits(relu)
    fat0 = asp.sparsify_(tiny_model(arch), asp.ProSparseConfig(threshold=0.0))
    assert torch.equal(logits(fat0), reference)
    s0 = mlp_sparsity(fat0)
    fat = asp.sparsify_(tiny_model(arch), asp.ProSparseConfig(threshold=0.05))
    assert 0.3 < s0 < mlp_sparsity(fat)


def test_prosparse_model_saves_as_a_relu_hf_model_and_reloads(tmp_path):
    from actsparse.io import load, save

    model = asp.sparsify_(tiny_model("llama"), asp.ProSparseConfig(threshold=0.03))
    save(model, tmp_path / "m")
    assert '"hidden_act": "relu"' in (tmp_path / "m" / "config.json").read_text()
    loaded, _ = load(tmp_path / "m")
    assert loaded.actsparse_config == model.actsparse_config
    assert torch.equal(logits(loaded), logits(model))
    assert mlp_sparsity(loaded) == mlp_sparsity(model)


# -- schedule ------------------------------------------------------------------------------


def ramp(step, t0, t1, l0, l1):
    eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (step - t0) / (t1 - t0)) + 1)
    return l0 + eta * (l1 - l0)


def test_schedule_values_at_stage_boundaries_and_mid_stage():
    config = asp.ProSparseConfig(stages=((10, 0.0), (20, 0.1), (40, 0.5), (60, 0.5), (100, 1.0)))
    s = L1Schedule.from_config(config, 100)
    assert s.stages == ((10, 0.0), (20, 0.1), (40, 0.5), (60, 0.5), (100, 1.0))
    expected = {0: 0.0, 9: 0.0, 10: 0.1, 15: 0.1, 19: 0.1, 20: 0.1, 30: 0.3, 40: 0.5, 50: 0.5, 60: 0.5,
                80: 0.75, 100: 1.0, 500: 1.0}
    for step, value in expected.items():
        assert s.lambda_at(step) == pytest.approx(value, abs=1e-12), step
    for step in (23, 37, 61, 99):
        t0, t1, l0, l1 = (20, 40, 0.1, 0.5) if step < 40 else (60, 100, 0.5, 1.0)
        assert s.lambda_at(step) == pytest.approx(ramp(step, t0, t1, l0, l1), abs=1e-12)
    # Continuous at every stage end: the ramp starts where the previous stage ended.
    for end, _ in s.stages[1:-1]:
        assert s.lambda_at(end) == pytest.approx(s.lambda_at(end - 1), abs=0.02)
    constant = L1Schedule.from_config(asp.ProSparseConfig(stages=config.stages, schedule="constant"), 100)
    assert [constant.lambda_at(t) for t in (0, 9, 10, 55, 99, 200)] == [0, 0, 1.0, 1.0, 1.0, 1.0]


def test_presets_scale_to_the_run_length_and_peak_lambda_rescales():
    s7 = L1Schedule.from_config(asp.ProSparseConfig(preset="7b"), 330)
    assert s7.stages == ((100, 0.0), (120, 5e-3), (200, 5e-2), (240, 5e-2), (320, 0.2), (330, 0.2))
    s1 = L1Schedule.from_config(asp.ProSparseConfig(preset="1b", peak_lambda=0.1), 70)
    assert [t for t, _ in s1.stages] == [20, 30, 40, 50, 70]
    assert [lam for _, lam in s1.stages] == pytest.approx([0.0, 2e-3, 1e-2, 1e-2, 0.1])
    with pytest.raises(ActSparseError):
        L1Schedule.from_config(asp.ProSparseConfig(), 3)


# -- penalty -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_l1_term_and_its_gradient(reduce):
    model = tiny_model("llama").double()
    specs = relufy_(model)
    model.train()
    seen = []

    def keep(module, args):
        args[0].retain_grad()
        seen.append(args[0])

    handles = [spec.mlp.down_linear.register_forward_pre_hook(keep) for spec in specs]
    with IntermediateL1(model, reduce) as penalty:
        model(EVAL)
        term = penalty.pop_term()
    for h in handles:
        h.remove()
    per_layer = [m.detach().abs().mean() for m in seen]
    expected = sum(per_layer) / (len(seen) if reduce == "mean" else 1)
    assert term.item() == pytest.approx(expected.item(), rel=1e-12)
    term.backward()
    # The last layer's m feeds no later term: its gradient is exactly sign(m) / (entries [* layers]).
    last = seen[-1]
    divisor = len(seen) if reduce == "mean" else 1
    assert torch.allclose(last.grad, torch.sign(last.detach()) / (last.numel() * divisor), rtol=0, atol=1e-15)
    # Through autograd to a weight: the directional derivative along a random change of the last
    # up projection matches central finite differences (through earlier layers the kinks of ReLU
    # and |.| make finite differences noisy).
    weight = specs[-1].mlp.up_linear.weight
    direction = torch.randn_like(weight)

    def term_at(eps):
        with torch.no_grad():
            weight.add_(eps * direction)
            with IntermediateL1(model, reduce) as p:
                model(EVAL)
                value = p.pop_term().item()
            weight.sub_(eps * direction)
        return value

    numeric = (term_at(1e-6) - term_at(-1e-6)) / 2e-6
    assert (weight.grad * direction).sum().item() == pytest.approx(numeric, rel=1e-5)
    # Hooks are gone: a second forward adds no term.
    model(EVAL)
    with pytest.raises(RuntimeError):
        penalty.pop_term()


def test_l1_sees_nothing_in_eval_mode():
    model = tiny_model("llama")
    relufy_(model)
    with IntermediateL1(model) as penalty, torch.no_grad():
        model.eval()(EVAL)
        zeros, entries = penalty.pop_sparsity()
        assert entries.sum() == 0
        with pytest.raises(RuntimeError):
            penalty.pop_term()


# -- training ------------------------------------------------------------------------------


def test_data_shards_are_disjoint_and_cover_each_epoch():
    windows = torch.arange(20)[:, None].repeat(1, 4)
    ranks = [ShardedBatches(windows, 3, rank=r, world_size=2, seed=7) for r in range(2)]
    assert ranks[0].per_epoch == 3
    epoch = [set(b.indices(k).tolist()) for k in range(3) for b in ranks]
    assert all(len(s) == 3 for s in epoch)
    assert len(set().union(*epoch)) == 18
    assert ranks[0].indices(3).tolist() != ranks[0].indices(0).tolist()  # a new permutation each epoch
    with pytest.raises(ActSparseError):
        ShardedBatches(windows, 11, world_size=2)


def test_a_few_steps_raise_measured_sparsity_with_finite_loss(tmp_path):
    before = mlp_sparsity(asp.sparsify_(tiny_model("llama"), asp.ProSparseConfig(threshold=0.0)))
    model = tiny_model("llama")
    config = asp.ProSparseConfig(threshold=0.0, schedule="constant", stages=((1, 0.0), (2, 2.0)))
    history = train_prosparse(model, TRAIN, config, TrainArgs(steps=12, batch_size=8, lr=1e-2, log_every=4), tmp_path,
                              progress=False)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["l1"]) for r in history)
    assert history[-1]["l1"] < history[0]["l1"]
    assert history[-1]["sparsity"] > history[0]["sparsity"]
    assert model.actsparse_config == config
    after = mlp_sparsity(model)
    assert after > before + 0.1, (before, after)
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [4, 8, 12]
    assert {"lambda", "l1", "loss", "sparsity", "sparsity_0", "sparsity_1"} <= set(rows[0])
    assert all(r["kd"] == 0 and r["hidden"] == 0 for r in history)


def test_a_train_threshold_masks_the_training_forward_and_its_gradient(tmp_path):
    args = TrainArgs(steps=3, batch_size=8, lr=1e-2, log_every=1)
    common = dict(threshold=0.02, schedule="constant", stages=((1, 0.0), (2, 0.5)))
    runs = {}
    for t in (0.0, 0.2, 1e6):
        model = tiny_model("llama")
        history = train_prosparse(model, TRAIN, asp.ProSparseConfig(train_threshold=t, **common), args,
                                  tmp_path / str(t), progress=False)
        runs[t] = model, history
    # the same weights see the same first batch: only the training mask differs
    assert runs[0.2][1][0]["sparsity"] > runs[0.0][1][0]["sparsity"] + 0.1
    # nothing passes a huge threshold: every MLP input is zero, and gate and up learn nothing
    model, history = runs[1e6]
    assert all(r["sparsity"] == 1.0 for r in history)
    untrained = tiny_model("llama")
    for spec, fresh in zip(layer_specs(model), layer_specs(untrained)):
        for name in (spec.gate, spec.up):
            assert torch.equal(model.get_submodule(f"{spec.mlp_prefix}.{name}").weight,
                               untrained.get_submodule(f"{fresh.mlp_prefix}.{name}").weight)
    # what is saved runs at the inference threshold, not the training one
    assert all(float(spec.mlp.gate_threshold) == pytest.approx(0.02) for spec in layer_specs(runs[0.2][0]))


def test_distillation_against_itself_is_zero_and_needs_a_teacher(tmp_path):
    model = tiny_model("llama")
    relufy_(model)
    schedule = L1Schedule(stages=((1, 0.0), (2, 0.0)))
    args = TrainArgs(steps=1, batch_size=4, lr=1e-3, log_every=1, distill=1.0)
    history = train(model, TRAIN, schedule, args, tmp_path / "a", progress=False,
                    teacher=copy.deepcopy(model).requires_grad_(False))
    assert abs(history[0]["kd"]) < 1e-6 and history[0]["loss"] > 1
    with pytest.raises(ActSparseError, match="teacher"):
        train(model, TRAIN, schedule, args, tmp_path / "b", progress=False)
    with pytest.raises(ActSparseError, match="distill"):
        TrainArgs(distill=1.5)


def test_distillation_pulls_the_relu_model_towards_the_silu_model(tmp_path):
    teacher_logits = logits(tiny_model("llama"))
    config = asp.ProSparseConfig(threshold=0.0, schedule="constant", stages=((1, 0.0), (2, 0.0)))
    args = TrainArgs(steps=12, batch_size=8, lr=1e-2, log_every=4, distill=1.0)
    model = tiny_model("llama")
    history = train_prosparse(model, TRAIN, config, args, tmp_path, progress=False)
    assert history[-1]["kd"] < history[0]["kd"]
    plain = tiny_model("llama")
    train_prosparse(plain, TRAIN, config, TrainArgs(steps=12, batch_size=8, lr=1e-2, log_every=4), tmp_path / "plain",
                    progress=False)
    kl = lambda m: torch.nn.functional.kl_div(logits(m).log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True,
                                              reduction="batchmean").item()
    assert kl(model) < kl(plain)
    assert model.actsparse_recipe["training"]["distill"] == 1.0


def test_lm_and_kl_is_transformers_loss_and_the_kl_from_one_log_softmax():
    student, teacher = tiny_model("llama"), tiny_model("llama", seed=1)
    out = student(input_ids=EVAL, labels=EVAL)
    target = logits(teacher)
    ce, kd = lm_and_kl(out.logits, target, EVAL)
    assert ce.item() == pytest.approx(out.loss.item(), rel=1e-6)
    p, q = target.softmax(-1), out.logits.float().softmax(-1)
    assert kd.item() == pytest.approx((p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-5)
    assert kd.item() > 1e-3
    (ce + kd).backward()
    assert student.lm_head.weight.grad.abs().sum() > 0


def test_layer_outputs_are_what_each_decoder_layer_returns():
    model = tiny_model("llama")
    outputs = LayerOutputs(model)
    with torch.no_grad():
        states = model(input_ids=EVAL, output_hidden_states=True).hidden_states
    kept = outputs.pop()
    # transformers' last hidden state is the final norm's output; the others are the layers'.
    assert len(kept) == len(states) - 1 == 2
    assert torch.equal(kept[0], states[1])
    assert torch.equal(model.model.norm(kept[1]), states[2])
    with pytest.raises(RuntimeError, match="expected one forward pass"):
        outputs.pop()
    outputs.remove()
    model(input_ids=EVAL)
    with pytest.raises(RuntimeError, match=r"saw \[0, 0\]"):
        outputs.pop()


def test_hidden_distillation_is_zero_against_itself_and_its_gradient_reaches_the_student():
    student = tiny_model("llama")
    relufy_(student)
    teacher = copy.deepcopy(student)
    outputs = (LayerOutputs(student), LayerOutputs(teacher))
    args = TrainArgs(distill_hidden=1.0)
    _, kd, hidden = _losses(student(input_ids=EVAL, labels=EVAL), teacher, EVAL, args, outputs)
    assert kd.item() == 0 and hidden.item() == 0
    first = student.model.layers[0]
    with torch.no_grad():
        first.mlp.up_proj.weight.add_(0.05 * torch.randn_like(first.mlp.up_proj.weight))
    _, kd, hidden = _losses(student(input_ids=EVAL, labels=EVAL), teacher, EVAL, args, outputs)
    reference = []
    for model in (student, teacher):
        layers = []
        handles = [layer.register_forward_hook(lambda m, a, o: layers.append(o)) for layer in model.model.layers]
        with torch.no_grad():
            model(input_ids=EVAL)
        for h in handles:
            h.remove()
        reference.append(layers)
    terms = [((s - t) ** 2).mean() / (t**2).mean() for s, t in zip(*reference)]
    assert len(terms) == 2 and hidden.item() > 1e-4
    assert hidden.item() == pytest.approx(sum(terms).item() / 2, rel=1e-5)
    hidden.backward()
    assert first.mlp.up_proj.weight.grad.abs().sum() > 0 and first.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_hidden_distillation_trains_logs_and_pulls_the_hidden_states_towards_the_teacher(tmp_path):
    teacher = tiny_model("llama")

    def gap(model):
        outputs = (LayerOutputs(model), LayerOutputs(teacher))
        with torch.no_grad():
            gap = _losses(model(input_ids=EVAL, labels=EVAL), teacher, EVAL, TrainArgs(distill_hidden=1.0), outputs)[2].item()
        for o in outputs:
            o.remove()
        return gap

    config = asp.ProSparseConfig(threshold=0.0, schedule="constant", stages=((1, 0.0), (2, 0.0)))
    model = tiny_model("llama")
    args = TrainArgs(steps=12, batch_size=8, lr=3e-3, log_every=4, distill_hidden=5.0)
    history = train_prosparse(model, TRAIN, config, args, tmp_path, progress=False)
    assert all(math.isfinite(r["loss"]) and r["kd"] == 0 and r["hidden"] > 0 for r in history)
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert list(rows[0]).index("hidden") == list(rows[0]).index("kd") + 1
    assert [float(r["hidden"]) for r in rows] == pytest.approx([r["hidden"] for r in history])
    assert model.actsparse_recipe["training"]["distill_hidden"] == 5.0
    plain = tiny_model("llama")
    train_prosparse(plain, TRAIN, config, TrainArgs(steps=12, batch_size=8, lr=3e-3, log_every=4), tmp_path / "plain",
                    progress=False)
    assert gap(model) < gap(plain) / 2, (gap(model), gap(plain))


def test_training_continues_a_relu_model_against_the_teacher_passed_in(tmp_path):
    original = tiny_model("llama")
    before = copy.deepcopy(original.state_dict())
    config = asp.ProSparseConfig(threshold=0.0, schedule="constant", stages=((1, 0.0), (2, 0.1)))
    args = TrainArgs(steps=2, batch_size=4, lr=1e-3, log_every=1, distill=1.0)
    first_kd = {}
    for name, teacher in (("itself", None), ("original", original)):
        relu = copy.deepcopy(original)
        relufy_(relu)  # an earlier run's ReLU student, as it would be loaded
        history = train_prosparse(relu, TRAIN, config, args, tmp_path / name, progress=False, teacher=teacher)
        first_kd[name] = history[0]["kd"]
    # By default the teacher is the model as given: here the ReLU model itself, so nothing to learn at first.
    assert first_kd["itself"] == pytest.approx(0, abs=1e-6) and first_kd["original"] > 1e-3
    assert all(torch.equal(before[k], v) for k, v in original.state_dict().items())
    assert all(p.requires_grad for p in original.parameters())


def test_both_distillation_terms_share_one_teacher_forward_per_micro_batch(tmp_path):
    model = tiny_model("llama")
    relufy_(model)
    teacher = tiny_model("llama").requires_grad_(False)
    calls = []
    teacher.register_forward_hook(lambda module, args, out: calls.append(out.logits.shape[0]))
    args = TrainArgs(steps=2, batch_size=4, grad_accum=2, lr=1e-3, log_every=1, distill=0.5, distill_hidden=2.0)
    history = train(model, TRAIN, L1Schedule(stages=((1, 0.0), (2, 0.5))), args, tmp_path, progress=False, teacher=teacher)
    assert calls == [4] * 4
    assert all(math.isfinite(r["loss"]) and r["kd"] > 0 and r["hidden"] > 0 for r in history)


def test_hidden_distillation_rejects_a_negative_weight_and_needs_a_teacher(tmp_path):
    with pytest.raises(ActSparseError, match=r"distill_hidden must be >= 0, got -0\.1"):
        TrainArgs(distill_hidden=-0.1)
    with pytest.raises(ActSparseError, match=r"distill_hidden=0\.5 needs a teacher"):
        train(tiny_model("llama"), TRAIN, L1Schedule(stages=((1, 0.0), (2, 0.0))), TrainArgs(steps=1, distill_hidden=0.5),
              tmp_path, progress=False)
    assert not (tmp_path / "train_log.csv").exists()


def test_resume_from_a_checkpoint_gives_the_same_next_steps(tmp_path):
    config = asp.ProSparseConfig(stages=((2, 0.0), (3, 0.5), (6, 1.0)))
    args = TrainArgs(steps=6, batch_size=4, grad_accum=2, lr=5e-3, log_every=1, save_every=3)
    whole = tiny_model("llama")
    full = train_prosparse(whole, TRAIN, config, args, tmp_path / "a", progress=False)
    resumed_model = tiny_model("llama")
    resumed = train_prosparse(resumed_model, TRAIN, config, args, tmp_path / "b", resume=tmp_path / "a" / "checkpoints" / "step-000003",
                              progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(resumed) == strip(full[3:])
    for (name, a), b in zip(whole.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    # Resuming in place keeps the log up to the checkpoint and rewrites what follows.
    train_prosparse(tiny_model("llama"), TRAIN, config, args, tmp_path / "a", resume=tmp_path / "a", progress=False)
    rows = list(csv.DictReader((tmp_path / "a" / "train_log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    other = TrainArgs(steps=6, batch_size=2, grad_accum=2, lr=5e-3, log_every=1)
    with pytest.raises(ActSparseError, match="batch_size"):
        train_prosparse(tiny_model("llama"), TRAIN, config, other, tmp_path / "c", resume=tmp_path / "a", progress=False)
    # Another stage table is another run too.
    with pytest.raises(ActSparseError, match="config="):
        train_prosparse(tiny_model("llama"), TRAIN, dataclasses.replace(config, peak_lambda=0.7), args, tmp_path / "c",
                        resume=tmp_path / "a", progress=False)


def test_a_time_limit_stops_at_a_checkpoint_and_resuming_gives_the_uninterrupted_run(tmp_path):
    config = asp.ProSparseConfig(stages=((2, 0.0), (3, 0.5), (6, 1.0)))
    args = TrainArgs(steps=6, batch_size=4, grad_accum=2, lr=5e-3, log_every=1)
    whole = tiny_model("llama")
    full = train_prosparse(whole, TRAIN, config, args, tmp_path / "whole", progress=False)
    # A limit no step fits in stops after every step; the stop logs its step although log_every is 4.
    limited = dataclasses.replace(args, time_limit=1e-9, log_every=4)
    model = tiny_model("llama")
    rows = train_prosparse(model, TRAIN, config, limited, tmp_path / "run", progress=False)
    assert [r["step"] for r in rows] == [1] and not finished(rows, limited)
    assert (tmp_path / "run" / "checkpoints" / "step-000001" / "model.safetensors").is_file()
    assert getattr(model, "actsparse_config", None) is None  # ReLU-fied, not finalised
    assert all(isinstance(spec.mlp.act_fn, torch.nn.ReLU) for spec in layer_specs(model))
    rows += train_prosparse(tiny_model("llama"), TRAIN, config, limited, tmp_path / "run", resume=tmp_path / "run",
                            progress=False)
    # The limit is not part of what a checkpoint must match: the last call has none and finishes.
    model = tiny_model("llama")
    last = train_prosparse(model, TRAIN, config, args, tmp_path / "run", resume=tmp_path / "run", progress=False)
    assert finished(last, args) and model.actsparse_config == config
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(rows + last) == strip(full)
    for (name, a), b in zip(whole.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    logged = list(csv.DictReader((tmp_path / "run" / "train_log.csv").open()))
    assert [int(r["step"]) for r in logged] == [1, 2, 3, 4, 5, 6]
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ActSparseError, match=f"time_limit must be > 0 seconds .*got {bad}"):
            TrainArgs(time_limit=bad)


def test_compiled_layers_train_like_eager_with_one_graph_for_every_layer(tmp_path):
    torch.compiler.reset()
    schedule = L1Schedule(stages=((1, 0.5), (2, 1.0)))
    rows = {}
    for compiled in (False, True):
        model = tiny_model("llama")
        teacher = copy.deepcopy(model).requires_grad_(False)
        relufy_(model)
        args = TrainArgs(steps=2, batch_size=4, lr=1e-3, log_every=1, distill=0.5, distill_hidden=2.0, compile=compiled)
        # Three graphs: one for the student's layers (training), one for the teacher's and one for
        # the vocabulary-wide losses; a graph per layer (as when the L1 hooks' per-layer state was
        # guarded on) fails here.
        counters.clear()
        with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
            rows[compiled] = train(model, TRAIN, schedule, args, tmp_path / str(compiled), progress=False,
                                   teacher=teacher)
        assert counters["stats"]["unique_graphs"] == (3 if compiled else 0)
        assert all(layer._compiled_call_impl is None for m in (model, teacher) for layer in m.model.layers)
    torch.compiler.reset()
    assert rows[True][-1]["l1"] > 0 and 0 < rows[True][-1]["sparsity"] < 1
    for eager, compiled in zip(rows[False], rows[True]):
        for key in ("loss", "kd", "hidden", "l1", "sparsity", "sparsity_0", "sparsity_1"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key


def test_hf_trainer_callback_adds_the_scheduled_penalty(tmp_path):
    from transformers import Trainer, TrainingArguments

    from actsparse.train import ProSparseCallback

    model = tiny_model("llama")
    relufy_(model)
    config = asp.ProSparseConfig(stages=((1, 0.0), (2, 0.5), (4, 1.0)))
    callback = ProSparseCallback(config, log_path=tmp_path / "l1.csv")
    data = [{"input_ids": w, "labels": w} for w in TRAIN[:16]]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    schedule = L1Schedule.from_config(config, 4)
    assert [r["step"] for r in callback.history] == [1, 2, 3, 4]
    assert [r["lambda"] for r in callback.history] == [schedule.lambda_at(s - 1) for s in (1, 2, 3, 4)]
    assert all(0 < r["sparsity"] < 1 and r["l1"] > 0 for r in callback.history)
    assert len(list(csv.DictReader((tmp_path / "l1.csv").open()))) == 4
    assert all(not spec.mlp.down_linear._forward_pre_hooks for spec in layer_specs(model))
    assert not model._forward_hooks

    # The loss the Trainer optimises is the model's loss plus lambda * L1.
    model.train()
    state = type("State", (), {"max_steps": 4, "global_step": 3, "is_world_process_zero": True})()
    callback.on_train_begin(args, state, None, model=model)
    with torch.no_grad():
        with_penalty = model(input_ids=EVAL, labels=EVAL).loss
        callback.on_train_end(args, state, None)
        ce = model(input_ids=EVAL, labels=EVAL).loss
    with IntermediateL1(model) as penalty, torch.no_grad():
        model(input_ids=EVAL, labels=EVAL)
        l1 = penalty.pop_term()
    assert with_penalty.item() == pytest.approx(ce.item() + schedule.lambda_at(3) * l1.item(), rel=1e-6)


def test_hf_trainer_callback_trains_under_the_train_threshold(tmp_path):
    from transformers import Trainer, TrainingArguments

    from actsparse.train import ProSparseCallback

    model = tiny_model("llama")
    relufy_(model)
    callback = ProSparseCallback(asp.ProSparseConfig(train_threshold=1e6, stages=((1, 0.0), (2, 0.5))))
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=[{"input_ids": w, "labels": w} for w in TRAIN[:4]],
            callbacks=[callback]).train()
    assert [r["sparsity"] for r in callback.history] == [1.0, 1.0]  # nothing passes the threshold while training
