"""The k-NN monitor sharded over ranks (gloo, two processes) computes what one process computes.

Each rank decodes and embeds only its batches; the BatchNorm statistics pass is all-reduced and the
features all-gathered, so the features, their order and the score equal a single process's.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from _recipe_helpers import make_labelled_folder
from sparsify.recipes.knn import KnnMonitor, batchnorm_statistics_from

HERE = Path(__file__).resolve().parent
MEAN, STD = (0.5,) * 3, (0.25,) * 3


def _encoder() -> torch.nn.Module:
    sys.path.insert(0, str(HERE))
    from tiny_models import tiny_cnn

    import sparsify

    torch.manual_seed(0)
    model = tiny_cnn()
    with torch.no_grad():  # statistics far from what the images give: re-estimation must matter
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.fill_(3.0)
    return sparsify.wrap(model, input_size=(32, 32))


def _evaluate(folder: Path, rank: int, world: int) -> dict:
    mon = KnnMonitor(folder, (32, 32), 3, MEAN, STD, k=3, batch=3, rank=rank, world_size=world)
    enc = _encoder()
    cpu = torch.device("cpu")
    with batchnorm_statistics_from(enc, mon.bank, mon.batch, cpu, None, reduce=None if world == 1 else _sum):
        feats = mon.features(enc, cpu)
    return {"acc": mon.evaluate(enc, cpu), "feats": feats, "local": len(mon.bank), "desc": mon.description}


def _sum(t: torch.Tensor) -> torch.Tensor:
    from sparsify.recipes import distributed as dist_utils

    return dist_utils.all_reduce_sum(t)


def _worker(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(_evaluate(Path(folder), rank, world), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_monitor_equals_one_process(tmp_path: Path) -> None:
    folder = make_labelled_folder(tmp_path / "knn", per_class=8)  # 16 images: batches of 3 -> 9 and 7 per rank
    one = _evaluate(folder, 0, 1)
    mp.spawn(_worker, args=(2, _free_port(), str(folder), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["local"] for r in ranks] == [9, 7] and one["local"] == 16  # each rank decoded its share only
    for r in ranks:
        assert r["desc"] == one["desc"] == "16 images, 2 classes, leave-one-out"
        assert r["acc"] == one["acc"]
        bank, labels, _, _ = r["feats"]
        assert torch.equal(labels, one["feats"][1])
        torch.testing.assert_close(bank, one["feats"][0], rtol=1e-5, atol=1e-6)
