"""Two torchrun "nodes" on one host (static rendezvous, gloo, one process each, one shared run folder)
train exactly like one node with two processes, and only global rank 0 locks the folder and writes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _recipe_helpers import TINY, losses
from sparsify.recipes.checkpoint import list_checkpoints

ARGS = ["--model", TINY, "--input-size", "32", "--batch-size", "8", "--decoder-width", "32", "--steps", "3",
        "--save-every", "1", "--keep", "0", "--base-lr", "0.5", "--warmup-steps", "0", "--vis-images", "0",
        "--no-tensorboard", "--workers", "0", "--device", "cpu", "--seed", "1"]  # fmt: skip

# The training script each process runs: the recipe, with every run-folder write recorded as "RANK what".
_SCRIPT = """
import os, sys
from sparsify.recipes import checkpoint, logs, pretrain
from sparsify.recipes.run_folder import RunFolder

EVENTS = os.environ["EVENTS"]

def record(what, fn):
    def wrapped(*args, **kwargs):
        with open(EVENTS, "a") as f:
            f.write(f"{os.environ['RANK']} {what}\\n")
        return fn(*args, **kwargs)
    return wrapped

RunFolder.lock = record("lock", RunFolder.lock)
RunFolder.prepare = record("prepare", RunFolder.prepare)
RunFolder.save_checkpoint = record("save_checkpoint", RunFolder.save_checkpoint)
checkpoint.atomic_save = record("atomic_save", checkpoint.atomic_save)
logs.RunLogger.__init__ = record("metrics", logs.RunLogger.__init__)
sys.exit(pretrain.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(events: Path) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "EVENTS": str(events)}


@pytest.mark.slow
def test_two_nodes_equal_one_node_with_two_processes(image_folder: Path, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    data = ["--data", str(image_folder)]
    run = [sys.executable, "-m", "torch.distributed.run"]

    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(
        [*run, "--standalone", "--nproc-per-node", "2", str(script), *data, *ARGS, "--out", str(one)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env(tmp_path / "events-one.txt"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    port = _free_port()
    nodes = [
        subprocess.Popen(
            [*run, "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
             "--master-port", str(port), str(script), *data, *ARGS, "--out", str(two)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env=_env(tmp_path / "events-two.txt"),
        )  # fmt: skip
        for node in (0, 1)
    ]
    outputs = [p.communicate(timeout=600) for p in nodes]
    for p, (out, err) in zip(nodes, outputs):
        assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "2 processes" in outputs[0][0]
    assert "sparsify-pretrain:" not in outputs[1][0]  # the second node prints nothing of the run

    la, lb = losses(one), losses(two)
    assert sorted(la) == sorted(lb) == [1, 2, 3]
    for step in la:
        assert lb[step] == pytest.approx(la[step], rel=1e-6)
    assert [s for s, _ in list_checkpoints(two / "checkpoints")] == [1, 2, 3]
    a = torch.load(one / "checkpoints" / "ckpt-00000003.pt", weights_only=True)["model"]
    b = torch.load(two / "checkpoints" / "ckpt-00000003.pt", weights_only=True)["model"]
    for k in a:
        if isinstance(a[k], torch.Tensor) and a[k].is_floating_point():
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)

    events = (tmp_path / "events-two.txt").read_text().split("\n")
    by_rank = {}
    for line in filter(None, events):
        rank, what = line.split()
        by_rank.setdefault(rank, []).append(what)
    assert set(by_rank) == {"0"}, by_rank  # global rank 1 (the second node's only process) wrote nothing
    assert by_rank["0"].count("lock") == 1
    assert {"prepare", "save_checkpoint", "atomic_save", "metrics"} <= set(by_rank["0"])
