"""Snakemake's slurm executor against the real single-node test cluster (.ci/slurm-setup.sh): a failing SLURM job
fails the workflow (test_slurm_conversion.py runs a whole conversion through the cluster)."""

import textwrap
import time

from slurm.cluster import run_snakemake_on_slurm, slurm_logdir
from slurm.cluster import slurm_cluster  # noqa: F401  (pytest fixture)

# A failing job is seen within about 35 s here: the plugin polls less often while nothing finishes.
MAX_WORKFLOW_SECONDS = 180

FAILING_SNAKEFILE = textwrap.dedent("""\
    rule fail:
        output: "never.txt"
        shell: "echo about to fail; exit 3"
    """)


def test_failing_slurm_job_fails_the_workflow(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(FAILING_SNAKEFILE)

    started = time.monotonic()
    result = run_snakemake_on_slurm(tmp_path, timeout=2 * MAX_WORKFLOW_SECONDS)

    assert result.returncode != 0
    assert time.monotonic() - started < MAX_WORKFLOW_SECONDS
    assert "SLURM status is: 'FAILED'" in result.stderr
    [job_log] = (slurm_logdir(tmp_path) / "rule_fail").glob("*.log")
    assert "about to fail" in job_log.read_text()
