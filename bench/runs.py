"""A training run's saves in one DAG: Snakemake's overhead for 20 saves of the demo size against 1 save.

    python -m bench.runs [--repeats N] [--saves 20] [--cache DIR] [--out DIR]

The demo checkpoint (the default demo: GPT, ZeRO-1, DP2, bf16, trained by DeepSpeed and cached) is copied
into two run folders: one save (global_step1), and N saves (global_step1 ... global_stepN, `latest` naming
the last). Each round, alternating which goes first, runs for each folder

* the conversion from scratch, `snakemake --cores 2 universal --config input_folder=RUN tags=all`;
* the rerun with nothing to do, which is Snakemake's own overhead alone: start-up, listing the saves and
  their signatures, and the DAG of every save's files, checked up to date (what `python -m ucpflow.watch`
  pays each time it looks again).

Reported: medians of both walls, the conversion's wall per save, and the ratios N saves / 1 save (target:
the rerun's ratio under 2). Every round checks that each save's universal checkpoint is complete (its
finalize summary written) and that latest_universal names the newest. Writes <out>/runs.json and <out>/runs.md.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.cases import DEMO, checkpoint_tag_folder
from bench.measure import run_measured
from bench.workflow import snapshot_workflow, workflow_fingerprint

REPO = Path(__file__).resolve().parents[1]
LONG_AGO = 1_000_000_000  # copies' modification times: not saves being written
TIMEOUT = 3600


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    return parser.parse_args(argv)


def make_run(tag, run, saves):
    """A run folder of `saves` copies of the tag folder, aged, with `latest` naming the last."""
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for step in range(1, saves + 1):
        shutil.copytree(tag, run / f"global_step{step}")
    (run / "latest").write_text(f"global_step{saves}")
    for root, dirs, names in os.walk(run):
        for name in dirs + names:
            os.utime(os.path.join(root, name), (LONG_AGO, LONG_AGO))


def command(snakefile, run, work_dir):
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(work_dir), "--cores", "2",
            "universal", "--config", f"input_folder={run}", "tags=all", f"work_folder={work_dir / 'work'}"]


def clean_outputs(run):
    for entry in run.iterdir():
        if entry.name.endswith("_universal") or entry.name == "latest_universal":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def problems(run, work_dir, saves):
    found = []
    summaries = list((work_dir / "work").glob("global_step*/*/summary.json"))
    if len(summaries) != saves:
        found.append(f"{run}: {len(summaries)} finalize summaries, not {saves}")
    if (run / "latest_universal").read_text().strip() != f"global_step{saves}_universal":
        found.append(f"{run}/latest_universal does not name global_step{saves}_universal")
    return found


def measure(name, snakefile, run, work_dir, logs):
    clean_outputs(run)
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    row = {}
    for phase in ("convert", "rerun"):
        log = logs / f"runs-{name}-{phase}.log"
        measured = run_measured(command(snakefile, run, work_dir), log_path=log, cwd=work_dir, timeout=TIMEOUT)
        if measured.returncode != 0:
            raise SystemExit(f"[bench.runs] {name} {phase} failed ({measured.returncode}); see {log}")
        if phase == "rerun" and "Nothing to be done" not in log.read_text():
            raise SystemExit(f"[bench.runs] the rerun of {name} did something; see {log}")
        row[f"{phase}_wall_s"] = round(measured.wall, 2)
    return row


def main(argv=None):
    args = parse(argv)
    tag = checkpoint_tag_folder(DEMO, args.cache)
    scratch = args.cache / "scratch" / "runs"
    snakefile = snapshot_workflow(REPO, scratch / "workflow")
    runs = {1: scratch / "run1", args.saves: scratch / f"run{args.saves}"}
    for saves, run in runs.items():
        make_run(tag, run, saves)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(args.repeats):
        order = list(runs.items()) if repeat % 2 == 0 else list(runs.items())[::-1]
        for saves, run in order:
            work_dir = scratch / f"work{saves}"
            row = dict(saves=saves, repeat=repeat, **measure(f"{saves}-{repeat}", snakefile, run, work_dir, logs),
                       load=os.getloadavg()[0])
            found = problems(run, work_dir, saves)
            if found:
                raise SystemExit(f"[bench.runs] {found}")
            rows.append(row)
            print(f"[bench.runs] {row}", flush=True)
    median = {saves: {key: statistics.median(row[key] for row in rows if row["saves"] == saves)
                      for key in ("convert_wall_s", "rerun_wall_s")} for saves in runs}
    one, many = median[1], median[args.saves]
    ratios = {"rerun": round(many["rerun_wall_s"] / one["rerun_wall_s"], 2),
              "convert": round(many["convert_wall_s"] / one["convert_wall_s"], 2),
              "convert_per_save": round(many["convert_wall_s"] / args.saves / one["convert_wall_s"], 2)}
    result = {"case": "demo", "saves": args.saves, "workflow": workflow_fingerprint(REPO), "runs": rows,
              "median": {str(saves): value for saves, value in median.items()}, "ratios": ratios}
    (args.out / "runs.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| saves | conversion wall s | per save s | rerun with nothing to do, wall s |", "|---|---|---|---|"]
    for saves in runs:
        lines.append(f"| {saves} | {median[saves]['convert_wall_s']} | "
                     f"{round(median[saves]['convert_wall_s'] / saves, 2)} | {median[saves]['rerun_wall_s']} |")
    lines.append(f"| ratio {args.saves} / 1 | {ratios['convert']} | {ratios['convert_per_save']} | {ratios['rerun']} |")
    (args.out / "runs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
