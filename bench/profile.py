"""Where a ucpflow run spends its time: per rule, and Snakemake's own time between jobs.

Three sources, each used for what it measures well:
- the job logs: every script rule ends its log with `rule X done in N s` (the work inside the job);
- the sampled process tree: each job's process from its start to its exit (work plus Python start-up
  and imports), and the stretches when Snakemake runs no job at all;
- Snakemake's metadata: the start time of every job, including those that run no process of their
  own (local no-op rules such as `publish`) or one too short for the 20 ms sampler.
"""

import json
import re
from pathlib import Path

DONE_LINE = re.compile(r"^rule (\w+) done in ([\d.]+) s$", re.MULTILINE)
SCRIPT_JOB = re.compile(r"/\.snakemake/scripts/tmp[^/]*\.(\w+)\.py$")


def logged_rule_times(log_folder):
    """{rule: [seconds inside each job]} from the `done in` lines; {rule: jobs} counted from the log files."""
    seconds, jobs = {}, {}
    for log in Path(log_folder).rglob("*.log"):
        text = log.read_text(errors="replace")
        done = DONE_LINE.findall(text)
        rule = done[-1][0] if done else log.parent.name
        jobs[rule] = jobs.get(rule, 0) + 1
        if done:
            seconds.setdefault(rule, []).append(float(done[-1][1]))
    return seconds, jobs


def job_rule(span, root_pid):
    """The rule whose script a sampled process runs as a job of Snakemake (`root_pid`), or None."""
    if span.ppid != root_pid:
        return None
    for argument in span.cmdline:
        match = SCRIPT_JOB.search(argument)
        if match:
            return match.group(1)
    return None


def job_starts(snakemake_folder, epoch_started):
    """{rule: sorted job start times (s since the run started)} from Snakemake's metadata records."""
    starts = {}
    seen_jobs = set()
    for record_path in (Path(snakemake_folder) / "metadata").iterdir():
        record = json.loads(record_path.read_text())
        # A job with several outputs has one record per output, all with the same job hash.
        if record.get("starttime") is None or record.get("job_hash") in seen_jobs:
            continue
        seen_jobs.add(record.get("job_hash"))
        starts.setdefault(record["rule"], []).append(record["starttime"] - epoch_started)
    return {rule: sorted(times) for rule, times in starts.items()}


def _union_length(intervals):
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def profile_run(measurement, work_folder, snakemake_folder):
    """A JSON-able breakdown of one ucpflow run's wall time."""
    seconds, log_jobs = logged_rule_times(Path(work_folder) / "logs")
    starts = job_starts(snakemake_folder, measurement.epoch_started)
    spans, cpu = {}, {}
    for span in measurement.spans:
        rule = job_rule(span, measurement.root_pid)
        if rule:
            spans.setdefault(rule, []).append((span.started, span.last_seen))
            cpu[rule] = cpu.get(rule, 0.0) + span.cpu_s
    snakemake_cpu = next((s.cpu_s for s in measurement.spans if s.pid == measurement.root_pid), 0.0)
    intervals = [interval for rule_spans in spans.values() for interval in rule_spans]
    rules = {}
    for rule in sorted(set(log_jobs) | set(spans) | set(starts), key=lambda r: min(starts.get(r, [1e9]))):
        rule_spans = spans.get(rule, [])
        rule_starts = starts.get(rule, [])
        rules[rule] = {
            "jobs": log_jobs.get(rule, len(rule_starts)),
            "in_job_s": round(sum(seconds.get(rule, [])), 3) if rule in seconds else None,
            "process_s": round(sum(stop - start for start, stop in rule_spans), 3),
            "process_cpu_s": round(cpu.get(rule, 0.0), 3),
            "processes_sampled": len(rule_spans),
            "first_start_s": round(rule_starts[0], 3) if rule_starts else None,
            "last_start_s": round(rule_starts[-1], 3) if rule_starts else None,
            "last_end_s": round(max(stop for _, stop in rule_spans), 3) if rule_spans else None,
        }
    first_job = min((start for start, _ in intervals), default=measurement.wall)
    last_job = max((stop for _, stop in intervals), default=measurement.wall)
    return {
        "wall_s": round(measurement.wall, 3),
        "cpu_s": round(measurement.cpu_s, 3),
        "snakemake_cpu_s": round(snakemake_cpu, 3),
        "rules": rules,
        "startup_s": round(first_job, 3),
        "no_job_running_s": round(measurement.wall - _union_length(intervals), 3),
        "after_last_job_s": round(measurement.wall - last_job, 3),
    }
