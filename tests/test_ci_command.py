"""CI runs exactly the README's test command (.ci/run says so; this keeps it true)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python3 -m venv")]
    readme = ROOT.joinpath("README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv") and "pytest" in line]
    assert len(ci) == 1 and len(commands) == 1, (ci, commands)
    assert ci[0] == commands[0]
    # nnU-Net's networks come without their dependencies: their timm<1.0.23 pin would downgrade timm
    assert "--no-deps dynamic-network-architectures" in ci[0]
