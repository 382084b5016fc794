"""Snakemake's slurm executor against the real single-node test cluster (.ci/slurm-setup.sh)."""

import subprocess
import textwrap
import time
from pathlib import Path

from slurm.cluster import run_snakemake_on_slurm, slurm_logdir
from slurm.cluster import slurm_cluster  # noqa: F401  (pytest fixture)

# Two SLURM jobs in a chain cost roughly 2 x 12 s with the plugin's polling.
MAX_WORKFLOW_SECONDS = 180

SNAKEFILE = textwrap.dedent("""\
    localrules: report

    rule report:
        input: "out/summary.txt"
        output: "out/report.txt"
        shell: "cat {input} > {output}; echo report_job=${{SLURM_JOB_ID:-none}} >> {output}"

    rule make_numbers:
        output: "out/numbers.txt"
        resources: mem_mb=200, runtime=5
        script: "make_numbers.py"

    rule summarize:
        input: "out/numbers.txt"
        output: "out/summary.txt"
        resources: mem_mb=200, runtime=5, cpus_per_task=1
        shell:
            "echo summarize_job=$SLURM_JOB_ID > {output};"
            " echo sum=$(awk '!/_job=/ {{total += $1}} END {{print total}}' {input}) >> {output};"
            " grep _job= {input} >> {output}"
    """)

MAKE_NUMBERS_SCRIPT = textwrap.dedent("""\
    import os

    with open(snakemake.output[0], "w") as out:
        out.write(f"make_numbers_job={os.environ['SLURM_JOB_ID']}\\n")
        out.writelines(f"{n}\\n" for n in range(1, 11))
    """)

FAILING_SNAKEFILE = textwrap.dedent("""\
    rule fail:
        output: "never.txt"
        shell: "echo about to fail; exit 3"
    """)


def read_key_values(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


def slurm_job_state(job_id: str) -> str:
    result = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--jobs", job_id, "--format", "%T"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_workflow_runs_remote_rules_as_slurm_jobs(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    (tmp_path / "make_numbers.py").write_text(MAKE_NUMBERS_SCRIPT)

    started = time.monotonic()
    result = run_snakemake_on_slurm(tmp_path, timeout=2 * MAX_WORKFLOW_SECONDS)
    elapsed = time.monotonic() - started

    assert result.returncode == 0, result.stderr
    assert elapsed < MAX_WORKFLOW_SECONDS

    report = read_key_values(tmp_path / "out" / "report.txt")
    assert report["sum"] == "55"
    assert report["report_job"] == "none", "the local rule must run outside SLURM"

    remote_job_ids = {
        "make_numbers": report["make_numbers_job"],
        "summarize": report["summarize_job"],
    }
    assert len(set(remote_job_ids.values())) == 2
    for rule, job_id in remote_job_ids.items():
        assert (slurm_logdir(tmp_path) / f"rule_{rule}" / f"{job_id}.log").is_file()
        assert slurm_job_state(job_id) == "COMPLETED"
    assert not (slurm_logdir(tmp_path) / "rule_report").exists()


def test_failing_slurm_job_fails_the_workflow(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_SNAKEFILE)

    started = time.monotonic()
    result = run_snakemake_on_slurm(tmp_path, timeout=2 * MAX_WORKFLOW_SECONDS)

    assert result.returncode != 0
    assert time.monotonic() - started < MAX_WORKFLOW_SECONDS
    assert "SLURM status is: 'FAILED'" in result.stderr
    [job_log] = (slurm_logdir(tmp_path) / "rule_fail").glob("*.log")
    assert "about to fail" in job_log.read_text()
