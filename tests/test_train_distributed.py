"""ProSparse training under `torchrun --nproc_per_node 2` (gloo, CPU) on a tiny model: the ranks
see different data shards, stay in sync, log the same schedule and sparsity, resume from a
checkpoint written by rank 0, and stop together when one rank runs out of time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path


TESTS = Path(__file__).parent

WORKER = textwrap.dedent(
    """
    import dataclasses, hashlib, json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from tiny import random_tokens, tiny_model
    from actsparse import ProSparseConfig
    from actsparse.train import ShardedBatches, TrainArgs, setup, train_prosparse

    out = sys.argv[1]
    dist = setup("cpu")
    windows = random_tokens(32, 16, seed=5)
    config = ProSparseConfig(stages=((1, 0.0), (2, 0.5), (4, 1.0)))
    args = TrainArgs(steps=4, batch_size=2, lr=1e-2, log_every=1, save_every=2)

    def digest(model):
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode()); h.update(tensor.detach().contiguous().numpy().tobytes())
        return h.hexdigest()

    def rows(history):
        return [{{k: v for k, v in r.items() if k != "seconds"}} for r in history]

    model = tiny_model("llama")
    history = train_prosparse(model, windows, config, args, out + "/run", dist=dist, progress=False)
    resumed = tiny_model("llama")
    resumed_history = train_prosparse(resumed, windows, config, args, out + "/resumed", dist=dist, progress=False,
                                      resume=out + "/run/checkpoints/step-000002")
    # Only rank 1 is out of time after a step; rank 0 stops with it.
    limited = dataclasses.replace(args, time_limit=1e-9 if dist.rank else 1e9)
    stopped = train_prosparse(tiny_model("llama"), windows, config, limited, out + "/limited", dist=dist,
                              progress=False)
    continued = tiny_model("llama")
    rest = train_prosparse(continued, windows, config, args, out + "/limited", dist=dist, progress=False,
                           resume=out + "/limited")
    shard = ShardedBatches(windows, 2, dist.rank, dist.world_size).indices(0).tolist()
    result = {{"rank": dist.rank, "world": dist.world_size, "shard": shard, "digest": digest(model),
               "resumed_digest": digest(resumed), "log": rows(history), "resumed_log": rows(resumed_history),
               "stopped_log": rows(stopped), "continued_digest": digest(continued), "continued_log": rows(rest)}}
    with open(f"{{out}}/rank{{dist.rank}}.json", "w") as f:
        json.dump(result, f)
    """
)


def test_two_ranks_with_gloo(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    # Different data shards on the two ranks.
    assert set(ranks[0]["shard"]).isdisjoint(ranks[1]["shard"])
    # Gradients are averaged: the parameters are the same on both ranks after training.
    assert ranks[0]["digest"] == ranks[1]["digest"]
    # The schedule and the (all-reduced) loss, L1 and sparsity log agree across ranks.
    assert ranks[0]["log"] == ranks[1]["log"]
    assert [r["lambda"] for r in ranks[0]["log"]] == [0.0, 0.5, 0.5, 0.75]
    assert [r["tokens"] for r in ranks[0]["log"]] == [64, 128, 192, 256]
    # Rank 0 wrote the checkpoint and the log; both ranks resumed from it to the same end.
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert len((tmp_path / "run" / "train_log.csv").read_text().splitlines()) == 5
    for r in ranks:
        assert r["resumed_digest"] == r["digest"]
        assert r["resumed_log"] == r["log"][2:]
        assert r["stopped_log"] == r["log"][:1] and r["continued_log"] == r["log"][1:]
        assert r["continued_digest"] == r["digest"]
