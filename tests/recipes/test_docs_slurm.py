"""The SLURM script in docs/ is valid bash, launches torchrun per node, and its recipe flags are accepted."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from sparsify.recipes.config import build_parser, explicit_settings, resolve_config

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "slurm_pretrain.sbatch"


def _command() -> list[str]:
    """The srun command of the script, continuation lines joined, shell variables given test values."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("srun "))
    for var, value in {"$DATA": "/data", "$OUT": "/runs/x", "$HEAD_NODE": "node1", "$SLURM_NNODES": "4",
                       "$GPUS_PER_NODE": "8", "$SLURM_JOB_ID": "7"}.items():  # fmt: skip
        line = line.replace(var, value)
    return shlex.split(line)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_runs_torchrun_per_node_with_accepted_flags() -> None:
    cmd = _command()
    torchrun = cmd[cmd.index("torchrun") :]
    assert torchrun[torchrun.index("--rdzv-backend") + 1] == "c10d"
    assert torchrun[torchrun.index("--rdzv-endpoint") + 1] == "node1:29500"
    assert torchrun[torchrun.index("--nnodes") + 1] == "4"
    recipe = torchrun[torchrun.index("sparsify.recipes.pretrain") + 1 :]
    cfg = resolve_config(explicit_settings(build_parser().parse_args(recipe)))
    assert (cfg.data, cfg.out, cfg.batch_size, cfg.on_divergence) == ("/data", "/runs/x", 4096, "rollback")
