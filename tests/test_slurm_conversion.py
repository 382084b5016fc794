"""A DeepSpeed checkpoint converted through profiles/slurm on the real single-node SLURM cluster
(.ci/slurm-setup.sh): the output equals ds_to_universal's, the heavy jobs ran as SLURM jobs and the
per-parameter publish jobs ran in the Snakemake process."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import REPO, ds_to_universal
from slurm.cluster import slurm_cluster, slurm_logdir  # noqa: F401  (pytest fixture)
from universal_compare import compare_universal
from workflow_runs import SHOW_JOBS, workflow_env
from ucpflow.source.signature import derived_folder

SUBMITTED = re.compile(r"^Job \S+ has been submitted with SLURM jobid (\d+) \(log: (.+)\)\.$", re.MULTILINE)

# Only what this test cluster needs beyond profiles/slurm.
CLUSTER_FLAGS = [
    "--slurm-status-command", "squeue",  # no slurmdbd: sacct answers nothing
    "--slurm-init-seconds-before-status-checks", "1",  # jobs here start at once
    "--latency-wait", "5",  # one node, one file system
    "--jobs", "4",  # two CPUs
    "--slurm-keep-successful-logs",  # the logs are the evidence
]  # fmt: skip


def submitted_rule(log_path, logdir):
    """The rule (or group) of a SLURM job, from the plugin's log path <logdir>/rule_<name>/... or group_<name>_..."""
    top = log_path.relative_to(logdir).parts[0]
    return top.removeprefix("rule_") if top.startswith("rule_") else top.removeprefix("group_").split("_")[0]


def slurm_states(job_ids):
    listed = subprocess.run(
        ["squeue", "--states=all", "--noheader", "--jobs", ",".join(job_ids), "--format", "%i %T"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return dict(line.split() for line in listed.splitlines())


def test_conversion_through_the_slurm_profile(slurm_cluster, deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint("z1_bf16_dp2", num_procs=2, zero_stage=1, dtype="bf16")
    workdir = tmp_path / "run"
    workdir.mkdir()
    output = tmp_path / "out" / f"{tag.name}_universal"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"),
               "--workflow-profile", str(REPO / "profiles" / "slurm"), *CLUSTER_FLAGS, *SHOW_JOBS,
               "--config", f"input_folder={tag}", f"output_folder={output}"]  # fmt: skip
    # The plugin puts its logs under the current directory.
    result = subprocess.run(command, cwd=workdir, env=workflow_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]

    theirs = ds_to_universal(tag, tmp_path / "theirs" / f"{tag.name}_universal")
    latest = "latest_universal"
    assert compare_universal(output, theirs, output.parent / latest, theirs.parent / latest) == []

    logdir = slurm_logdir(workdir)
    submissions = [(job_id, submitted_rule(Path(log), logdir)) for job_id, log in SUBMITTED.findall(result.stderr)]
    rules = [rule for _, rule in submissions]
    print(f"\n{len(submissions)} sbatch submissions: {sorted(rules)}")
    [work_folder] = (workdir / "ucpflow-work").iterdir()
    params = pd.read_csv(derived_folder(work_folder) / "index" / "params.tsv", sep="\t", keep_default_na=False)
    assert rules.count("index") == 1
    assert rules.count("extract") == 1, "the three extractions go into one group job"
    assert rules.count("merge") == params["bucket"].nunique()
    assert "publish" not in rules
    assert result.stderr.count("localrule publish:") == len(params)
    states = slurm_states([job_id for job_id, _ in submissions])
    assert set(states.values()) == {"COMPLETED"}, states
    for job_id, log in SUBMITTED.findall(result.stderr):
        assert Path(log).is_file() and Path(log).stem == job_id
