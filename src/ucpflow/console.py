"""The console of a run: the jobs' own lines, without Snakemake's scheduling lines ("Select jobs to execute...",
"Execute 2 jobs...", "Building DAG of jobs...", ...), and on failure a job's one `ucpflow error:` sentence and
where the logs are, without the exception report Snakemake prints after it (RuleException, CalledProcessError,
WorkflowError). Everything still goes to Snakemake's own log file, and `--verbose` shows it on the console too.

Only Python's logging API is used: a filter on the console handlers of Snakemake's logger, which reads each
record's text (and nothing of Snakemake's internals).
"""

import logging
import sys
from pathlib import Path

# A job that stopped on its own, after printing its one line to the terminal (ucpflow.smk.run), exits with
# this status; Snakemake's report of that exit adds nothing. Any other failure (a killed job) is reported.
JOB_FAILED_STATUS = 65
# What Snakemake adds after a failed job, already said by the job's line and the closing hint.
FOLLOW_UPS = (
    "Shutting down, this might take some time.",
    "Exiting because a job execution failed.",
    "At least one job did not complete successfully.",
)
SENTENCE = "ucpflow error:"
# Snakemake's scheduling chatter, which says nothing a user acts on (the jobs' own lines say what happens);
# `--verbose` shows it again. Each is the start of a record's text.
SCHEDULING = (
    "Select jobs to execute...",
    "Execute ",
    "Building DAG of jobs...",
    "Using shell:",
    "Conda environments: ignored",
    "Assuming unrestricted shared filesystem usage.",
    "DAG of jobs will be updated after completion.",
    "Updating checkpoint dependencies.",
)
# A dry run's summary of reasons points at per-job reasons that the default profile's `quiet` leaves out.
NO_JOBS_ABOVE = "(check individual jobs above for details)"


class FailedJobReport(logging.Filter):
    """Drops Snakemake's scheduling lines and its report of a job that printed its own error line; keeps
    everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if SENTENCE in text and not text.startswith(SENTENCE):
            # A job run in Snakemake's own process (publish): its sentence is the exception's message. It is
            # printed here, the record left whole for Snakemake's log file.
            print(text[text.index(SENTENCE) :].splitlines()[0], file=sys.stderr, flush=True)
            return False
        if f"non-zero exit status {JOB_FAILED_STATUS}." in text:
            return False
        if any(follow_up in text for follow_up in FOLLOW_UPS):
            return False
        if NO_JOBS_ABOVE in text:
            # Printed here without that line, the record left whole for Snakemake's log file.
            kept = [line for line in text.splitlines() if line.strip() != NO_JOBS_ABOVE]
            print("\n".join(kept), file=sys.stderr, flush=True)
            return False
        if text.startswith(SCHEDULING) and (not text.startswith("Execute ") or text.rstrip().endswith(" jobs...")):
            return False
        # After the closing hint (see `failure_hint`), Snakemake's own pointer to its log is a repetition.
        return not (self.failed and text.startswith(("Complete log(s):", "Elapsed time:")))


def install(logger: logging.Logger) -> "FailedJobReport | None":
    """Add the filter to `logger`'s console handlers, unless it logs at DEBUG level (`--verbose`)."""
    if logger.isEnabledFor(logging.DEBUG):
        return None
    report = FailedJobReport()
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(report)
    return report


def failure_hint(job_logs: str, snakemake_logs: list) -> str:
    """The last line of a failed run: where to read more."""
    where = f" and Snakemake's in {', '.join(snakemake_logs)}" if snakemake_logs else ""
    return f"ucpflow: the run stopped; every job's log is in {job_logs}/{where}."


def human_size(nbytes: float) -> str:
    """Bytes as people read them: 512 B, 1.36 MB, 2.11 TB (powers of 1000, as the README's sizes)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1000
    raise AssertionError("unreachable")


def _files_and_bytes(folder):
    files = [path for path in Path(folder).rglob("*") if path.is_file()]
    return len(files), sum(path.stat().st_size for path in files)


def hf_summary_line(folder: str, seconds: float) -> str:
    """The last line of `snakemake hf`: what was written and how to load it."""
    import os

    count, nbytes = _files_and_bytes(folder)
    return (
        f"ucpflow: wrote {folder} ({count} files, {human_size(nbytes)}) in {seconds:.1f} s. To use it, load it "
        f"with transformers.AutoModelForCausalLM.from_pretrained(\"{os.path.abspath(folder)}\")."
    )


def megatron_summary_line(folder: str, target_tp: int, target_pp: int, seconds: float) -> str:
    """The last line of `snakemake megatron`: what was written and how Megatron-LM loads it."""
    import os

    count, nbytes = _files_and_bytes(folder)
    return (
        f"ucpflow: wrote {folder} ({count} files, {human_size(nbytes)}, tp={target_tp} pp={target_pp}) in "
        f"{seconds:.1f} s. To train from it, start Megatron-LM with --load {os.path.abspath(folder)} "
        f"--tensor-model-parallel-size {target_tp} --pipeline-model-parallel-size {target_pp} "
        f"--no-load-optim --no-load-rng."
    )
