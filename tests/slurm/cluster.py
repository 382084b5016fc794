"""A real single-node SLURM cluster for tests, and Snakemake's slurm executor run against it.

Use from a test module or conftest.py (``tests/`` is on ``sys.path`` under pytest's
default import mode)::

    from slurm.cluster import run_snakemake_on_slurm, slurm_cluster  # noqa: F401

    def test_something(slurm_cluster, tmp_path):
        result = run_snakemake_on_slurm(tmp_path)
        assert result.returncode == 0, result.stderr
"""

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP_SCRIPT = REPO_ROOT / ".ci" / "slurm-setup.sh"
PARTITION = "debug"
USABLE_NODE_STATES = {"idle", "mix", "alloc", "comp"}
SETUP_TIMEOUT_SECONDS = 600


@dataclass(frozen=True)
class SlurmInfo:
    partition: str
    node: str
    cpus: int
    memory_mb: int


def cluster_status(partition: str = PARTITION) -> SlurmInfo | None:
    """The partition's node as ``sinfo`` reports it, or None if it cannot take jobs."""
    if not (shutil.which("sinfo") and shutil.which("sbatch")):
        return None
    try:
        result = subprocess.run(
            [
                "sinfo",
                "--Node",
                "--noheader",
                f"--partition={partition}",
                "--format=%N|%t|%c|%m",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        return None
    for line in result.stdout.splitlines():
        node, state, cpus, memory_mb = line.strip().split("|")
        if state in USABLE_NODE_STATES:
            return SlurmInfo(partition, node, int(cpus), int(memory_mb))
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> NoReturn:
    """In CI a missing cluster is a broken setup, elsewhere just a reason to skip."""
    if _in_ci():
        pytest.fail(f"SLURM test cluster unavailable: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


def ensure_slurm_cluster() -> SlurmInfo:
    """Return the running test cluster, starting it with .ci/slurm-setup.sh if needed (root only)."""
    info = cluster_status()
    if info:
        return info
    if os.geteuid() != 0:
        _unavailable(
            f"it is not running and starting it needs root: sudo {SETUP_SCRIPT}"
        )
    try:
        setup = subprocess.run(
            ["bash", str(SETUP_SCRIPT)],
            capture_output=True,
            text=True,
            timeout=SETUP_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"{SETUP_SCRIPT} did not finish within {SETUP_TIMEOUT_SECONDS}s")
    if setup.returncode != 0:
        _unavailable(
            f"{SETUP_SCRIPT} failed (exit {setup.returncode}):\n{setup.stdout}{setup.stderr}"
        )
    info = cluster_status()
    if not info:
        _unavailable(
            f"{SETUP_SCRIPT} succeeded but partition {PARTITION!r} has no usable node"
        )
    return info


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmInfo:
    return ensure_slurm_cluster()


def slurm_executor_args(
    partition: str = PARTITION,
    jobs: int = 2,
    default_resources: dict[str, object] | None = None,
) -> list[str]:
    """Snakemake options for the slurm executor plugin on this accounting-less test cluster."""
    resources = {"slurm_partition": partition, **(default_resources or {})}
    return [
        "--executor", "slurm",
        "--jobs", str(jobs),
        "--default-resources", *(f"{name}={value}" for name, value in resources.items()),
        # There is no slurmdbd, so sacct only answers "accounting storage is disabled";
        # squeue sees finished jobs for MinJobAge (300 s) after they end.
        "--slurm-status-command", "squeue",
        # The plugin waits this long before the first status check and again after
        # every finished job; each check that finds nothing finished adds 10 s.
        "--slurm-init-seconds-before-status-checks", "1",
        # Successful jobs' logs are deleted by default; keep them as evidence.
        "--slurm-keep-successful-logs",
        "--latency-wait", "5",
    ]  # fmt: skip


def slurm_logdir(workdir: Path) -> Path:
    """Where the plugin writes one log per SLURM job: <logdir>/rule_<name>/<jobid>.log."""
    return Path(workdir) / ".snakemake" / "slurm_logs"


def run_snakemake_on_slurm(
    workdir: Path,
    *extra_args: str,
    jobs: int = 2,
    default_resources: dict[str, object] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """Run ``snakemake`` in ``workdir`` (where its Snakefile is) through the slurm executor."""
    command = [
        sys.executable, "-m", "snakemake",
        *slurm_executor_args(jobs=jobs, default_resources=default_resources),
        *extra_args,
    ]  # fmt: skip
    # Jobs inherit this environment (sbatch --export=ALL); shell rules that call
    # `python` or `snakemake` must find this interpreter's environment first.
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(
        [str(Path(sys.executable).parent), env.get("PATH", "")]
    )
    # The plugin resolves its default log dir against the current directory.
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )
