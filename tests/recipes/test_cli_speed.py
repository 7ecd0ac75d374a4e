"""``--help`` and argument errors answer without importing torch (the 1.5 s target; 3 s bound here)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

_BOUND_S = 3.0  # generous against a loaded CI machine; measured ~0.05 s idle


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    code = (
        "import sys\n"
        f"from sparsify.recipes.{args[0]} import main\n"
        "try:\n"
        "    rc = main(sys.argv[1:])\n"
        "except SystemExit as exit:\n"  # argparse exits for --help and usage errors
        "    rc = exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(rc)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args[1:]], capture_output=True, text=True, timeout=60)
    return proc, time.perf_counter() - t0


@pytest.mark.parametrize(
    "args, rc, text",
    [
        (("pretrain", "--help"), 0, "--batch-size"),
        (("pretrain", "--bogus"), 2, "unrecognized arguments"),
        (("pretrain", "--batch-size", "0"), 2, "--batch-size must be >= 1"),
        (("pretrain", "--input-size", "12x"), 2, "input size must be"),
        (("pretrain", "--micro-batch", "4", "--accum", "2"), 2, "not both"),
        (("reconstruct", "--help"), 0, "--seed"),
        (("reconstruct",), 2, "the following arguments are required"),
        (("reconstruct", "/no/such/run"), 2, "neither a run folder nor a checkpoint"),
    ],
)
def test_help_and_argument_errors_are_fast_and_do_not_import_torch(args, rc, text):
    proc, seconds = _run(*args)
    assert proc.returncode == rc, proc.stderr
    assert text in proc.stdout + proc.stderr
    assert "torch was imported" not in proc.stderr
    assert seconds < _BOUND_S, f"{' '.join(args)} took {seconds:.2f} s"
