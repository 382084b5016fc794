"""results.csv, summary.md and wall_rss.png from the benchmark's runs."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psutil

from bench.cases import build_record

TOOLS = ("ds_to_universal", "ucpflow")
COLORS = {"ds_to_universal": "#7f7f7f", "ucpflow": "#1f77b4"}
# Ratios ucpflow / ds_to_universal the issue asks for (None: no target).
TARGETS = {
    "gpt355": {"wall": 0.4, "rss": 1 / 3},
    "gpt124": {"wall": 0.6, "rss": 1 / 2},
    "many": {"wall": 1.5, "rss": None},
}
TEMP_FILES_PER_RANK_FILE_TARGET = 4
# The files that carry data from one step to the next (what the temp-file target is about); logs,
# benchmarks, report tables, Snakemake's records and ucpflow's kept staging folder (hard links of the
# output's own files) are listed too, but hold no intermediate data.
INTERMEDIATE_CATEGORIES = {
    "ds_to_universal": ("tmp/ inside the output",),
    "ucpflow": ("work folder: extract/", "work folder: index/"),
}
DRY_RUN_TARGET_S = 10
GIB, MIB = 2**30, 2**20


def machine_info(repo):
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "deepspeed": version("deepspeed"),
        "snakemake": version("snakemake"),
        "ucpflow_commit": commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else ""),
        "load_average_at_start": os.getloadavg(),
    }


def write_json(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


def write_all(out, benches, dry_run, machine):
    import pandas as pd

    out = Path(out)
    rows = pd.DataFrame([row for bench in benches for row in bench.rows])
    rows.to_csv(out / "results.csv", index=False)
    medians = median_table(rows)
    write_json(out / "dry_run.json", dry_run_record(dry_run))
    (out / "summary.md").write_text(summary(rows, medians, benches, dry_run, machine))
    plot(rows, medians, out / "wall_rss.png")


def median_table(rows):
    """{(case, tool): medians over the timed runs}."""
    timed = rows[rows["kind"] == "timed"]
    table = {}
    for (case, tool), runs in timed.groupby(["case", "tool"], sort=False):
        table[(case, tool)] = {
            "runs": len(runs),
            "wall_s": runs["wall_s"].median(),
            "wall_min": runs["wall_s"].min(),
            "wall_max": runs["wall_s"].max(),
            "cpu_s": runs["cpu_s"].median(),
            "rss_process": runs["peak_rss_process_bytes"].median(),
            "rss_tree": runs["peak_rss_tree_bytes"].median(),
            "identical": bool(rows[(rows["case"] == case) & (rows["tool"] == tool)]["identical"].all()),
            "load_min": min(runs["load_1min_before"].min(), runs["load_1min_after"].min()),
            "load_max": max(runs["load_1min_before"].max(), runs["load_1min_after"].max()),
        }
    return table


def _ratio(medians, case, key):
    ours, theirs = medians.get((case, "ucpflow")), medians.get((case, "ds_to_universal"))
    return ours[key] / theirs[key] if ours and theirs and theirs[key] else None


def paired_wall_ratio(rows, case):
    """Median over rounds of ucpflow's wall / ds_to_universal's in the same round: the two ran back to back,
    under nearly the same load, so this is less sensitive to load drift than the ratio of medians."""
    timed = rows[(rows["kind"] == "timed") & (rows["case"] == case)]
    walls = timed.pivot_table(index="repeat", columns="tool", values="wall_s")
    if not set(TOOLS) <= set(walls.columns):
        return None
    return _median(list(walls["ucpflow"] / walls["ds_to_universal"]))


def intermediate_files_table(benches):
    """Files of intermediate data per rank file, against the target (ucpflow's merge-done markers,
    one per merge job, are Snakemake temp() files already deleted when the footprint is counted)."""
    lines = [
        f"Intermediate data files (ds_to_universal: {', '.join(INTERMEDIATE_CATEGORIES['ds_to_universal'])}; "
        f"ucpflow: {', '.join(INTERMEDIATE_CATEGORIES['ucpflow'])}) per rank file:",
        "",
        "| case | ds_to_universal | ucpflow | target | |",
        "|---|---|---|---|---|",
    ]
    for bench in benches:
        per_rank_file = {}
        for tool in TOOLS:
            categories = bench.footprints.get(tool, {})
            files = sum(categories[c].files for c in INTERMEDIATE_CATEGORIES[tool] if c in categories)
            per_rank_file[tool] = files / bench.rank_files if categories else None
        ours = per_rank_file["ucpflow"]
        lines.append(
            f"| {bench.case.name} | {_fmt(per_rank_file['ds_to_universal'])} | {_fmt(ours)} "
            f"| {TEMP_FILES_PER_RANK_FILE_TARGET} | {_verdict(ours, TEMP_FILES_PER_RANK_FILE_TARGET)} |"
        )
    return lines + [""]


def _verdict(value, target):
    if target is None or value is None:
        return ""
    return "met" if value <= target else "**missed**"


def _fmt(value, digits=3):
    return "" if value is None else f"{value:.{digits}f}"


def summary(rows, medians, benches, dry_run, machine):
    cases = list(dict.fromkeys(rows["case"]))
    lines = [
        "# ucpflow vs ds_to_universal",
        "",
        f"`{machine['command']}` on {machine['date']}. Medians over the timed runs; every run on the same "
        f"{machine['cores_usable']} cores, tools alternating. How it is measured: `bench/README.md`.",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| cores | {machine['cores']} ({machine['cores_usable']} usable), {machine['memory_gib']} GiB RAM |",
        f"| load average (1, 5, 15 min) at start | {', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])} |",
        f"| load average at end | {', '.join(f'{x:.2f}' for x in machine['load_average_at_end'])} |",
        f"| platform | {machine['platform']}, Python {machine['python']} |",
        f"| torch / deepspeed / snakemake | {machine['torch']} / {machine['deepspeed']} / {machine['snakemake']} |",
        f"| ucpflow commit | {machine['ucpflow_commit']} |",
        f"| workflow measured | a copy of the working tree taken at the start, hash "
        f"{machine['workflow_fingerprint_at_start']}; the working tree "
        + (
            "changed during the benchmark (hash at the end " f"{machine['workflow_fingerprint_at_end']})"
            if machine["workflow_fingerprint_at_start"] != machine["workflow_fingerprint_at_end"]
            else "did not change during the benchmark"
        )
        + " |",
        "",
    ]

    lines += [
        "## Wall time and peak RSS (medians)",
        "",
        "| case | tool | runs | wall s (min–max) | CPU s | peak RSS, largest process | peak RSS, whole tree "
        "| output identical to anchor | 1-min load during runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for tool in TOOLS:
            m = medians.get((case, tool))
            if m:
                lines.append(
                    f"| {case} | {tool} | {m['runs']} | {m['wall_s']:.1f} ({m['wall_min']:.1f}–{m['wall_max']:.1f}) "
                    f"| {m['cpu_s']:.1f} | {m['rss_process'] / MIB:.0f} MiB | {m['rss_tree'] / MIB:.0f} MiB "
                    f"| {'yes' if m['identical'] else '**no**'} | {m['load_min']:.1f}–{m['load_max']:.1f} |"
                )
    lines += [
        "",
        "*CPU s*: user + system time of the whole process tree (less sensitive to other load than wall time).",
        "",
        "## Ratios ucpflow / ds_to_universal",
        "",
        "*Wall* is the ratio of the medians; *wall, paired* the median over rounds of the ratio between "
        "the two runs of a round, which ran back to back.",
        "",
        "| case | wall | wall, paired | target | | peak RSS (largest process) | target | | peak RSS (tree) | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        target = TARGETS.get(case, {})
        wall, rss, tree, cpu = (_ratio(medians, case, key) for key in ("wall_s", "rss_process", "rss_tree", "cpu_s"))
        paired = paired_wall_ratio(rows, case)
        lines.append(
            f"| {case} | {_fmt(wall)} | {_fmt(paired)} | {_fmt(target.get('wall'))} "
            f"| {_verdict(wall, target.get('wall'))} | {_fmt(rss)} | {_fmt(target.get('rss'))} "
            f"| {_verdict(rss, target.get('rss'))} | {_fmt(tree)} | {_fmt(cpu)} |"
        )

    lines += [
        "",
        "## Files written outside the final output",
        "",
        "Counted after one extra run per tool that keeps its temp files (`--keep_temp_folder`, "
        "`keep_temp_folder=true`). *Extra bytes* leaves out hard links of the output's own files. "
        f"Target: ≤ {TEMP_FILES_PER_RANK_FILE_TARGET} temp files per rank file.",
        "",
        "| case | tool | category | files | MiB | extra MiB | files per rank file |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in benches:
        for tool in TOOLS:
            categories = bench.footprints.get(tool, {})
            for category, counted in categories.items():
                lines.append(
                    f"| {bench.case.name} | {tool} | {category} | {counted.files} | {counted.bytes / MIB:.1f} "
                    f"| {counted.extra_bytes / MIB:.1f} | {counted.files / bench.rank_files:.1f} |"
                )
            total = sum((c.files for c in categories.values()), 0)
            lines.append(
                f"| {bench.case.name} | {tool} | **all** | **{total}** | "
                f"{sum(c.bytes for c in categories.values()) / MIB:.1f} | "
                f"{sum(c.extra_bytes for c in categories.values()) / MIB:.1f} | "
                f"**{total / bench.rank_files:.1f}** |"
            )
    lines += ["", f"Rank files per case: {', '.join(f'{b.case.name} {b.rank_files}' for b in benches)}.", ""]
    lines += intermediate_files_table(benches)

    lines += [
        "## Where ucpflow's time goes",
        "",
        "Medians over the timed runs. *In job*: the `rule X done in N s` lines of the job logs. "
        "*Job processes*: each script job's process from start to exit as sampled (adds Python start-up "
        "and imports), and the CPU time they had used at their last sample; jobs that run no process "
        "of their own (local no-op rules) show none. *Window*: first job start to last job end (or start) "
        "of the rule, in seconds from the start of the run. *No job running*: wall time when the sampler "
        "saw no job process at all (Snakemake start-up, DAG updates, scheduling, and jobs without a process).",
        "",
    ]
    for bench in benches:
        timed = [p for p in bench.profiles if p["kind"] == "timed"]
        if not timed:
            continue
        lines += [
            f"### {bench.case.name}",
            "",
            "| rule | jobs | in job s | job processes s | their CPU s | window s |",
            "|---|---|---|---|---|---|",
        ]
        for rule in timed[0]["rules"]:
            values = [p["rules"][rule] for p in timed if rule in p["rules"]]
            in_job = [v["in_job_s"] for v in values if v["in_job_s"] is not None]
            # Jobs the sampler never saw (a no-op local rule) have no end: their window ends at the last start.
            window = (
                _median([v["first_start_s"] for v in values]),
                _median([v["last_end_s"] if v["last_end_s"] is not None else v["last_start_s"] for v in values]),
            )
            lines.append(
                f"| {rule} | {values[0]['jobs']} | {_fmt(_median(in_job), 2)} "
                f"| {_fmt(_median([v['process_s'] for v in values]), 2)} "
                f"| {_fmt(_median([v['process_cpu_s'] for v in values]), 2)} "
                f"| {_fmt(window[0], 1)}–{_fmt(window[1], 1)} |"
            )
        for rule, first in timed[0]["rules"].items():
            if first["processes_sampled"] == 0 and first["jobs"] > 1:
                values = [p["rules"][rule] for p in timed if rule in p["rules"]]
                per_job = _median([(v["last_start_s"] - v["first_start_s"]) / (v["jobs"] - 1) * 1000 for v in values])
                lines.append(
                    f"\n`{rule}`: {first['jobs']} jobs without a process of their own, one started every "
                    f"{per_job:.1f} ms (median over runs)."
                )
        lines += [
            "",
            f"Wall {_median([p['wall_s'] for p in timed]):.2f} s, CPU {_median([p['cpu_s'] for p in timed]):.2f} s "
            f"of which the Snakemake process itself {_median([p['snakemake_cpu_s'] for p in timed]):.2f} s; "
            "Snakemake start-up before the first job "
            f"{_median([p['startup_s'] for p in timed]):.2f} s; no job running "
            f"{_median([p['no_job_running_s'] for p in timed]):.2f} s; after the last job "
            f"{_median([p['after_last_job_s'] for p in timed]):.2f} s.",
            "",
        ]

    lines += dry_run_lines(dry_run)
    lines += [
        "## Checkpoints",
        "",
        "Built once with DeepSpeed on CPU processes (DP=2, ZeRO-1, bf16) and cached; build figures "
        "are from the run that built them.",
        "",
        "| case | layers / hidden / heads / vocab / seq_len / steps | size | build wall "
        "| peak RSS, largest process | tree | load when built |",
        "|---|---|---|---|---|---|---|",
    ]
    for bench in benches:
        record = build_record(bench.tag_folder)
        case = bench.case
        shape = f"{case.layers} / {case.hidden} / {case.heads} / {case.vocab} / {case.seq_len} / {case.steps}"
        if record:
            lines.append(
                f"| {case.name} | {shape} | {record['checkpoint_bytes'] / 1e9:.2f} GB | {record['wall_s']:.0f} s "
                f"| {record['peak_rss_process_bytes'] / GIB:.2f} GiB | {record['peak_rss_tree_bytes'] / GIB:.2f} GiB "
                f"| {record['load_average_before'][0]:.1f} |"
            )
        else:
            lines.append(f"| {case.name} | {shape} | | (no build record) | | | |")
    return "\n".join(lines) + "\n"


def dry_run_record(dry_run):
    if dry_run is None:
        return None
    shape, runs = dry_run
    return {"index": shape, "runs": runs, "median_wall_s": _median([r["wall_s"] for r in runs])}


def dry_run_lines(dry_run):
    if dry_run is None:
        return []
    shape, runs = dry_run
    median = _median([r["wall_s"] for r in runs])
    jobs = runs[0]["jobs"]
    walls = ", ".join(f"{r['wall_s']:.2f}" for r in runs)
    loads = ", ".join(f"{r['load_1min']:.1f}" for r in runs)
    return [
        "## Dry run at BLOOM-176B scale",
        "",
        f"`snakemake -n` on a synthetic index of BLOOM-176B's shapes (TP4 PP12 DP8: {shape['rank_files']} rank files, "
        f"{shape['parameters']} parameters, {shape['fragments']} fragment rows, {shape['merge_jobs']} merge jobs), "
        "tables only, with empty placeholder files for the checkpoint.",
        "",
        f"Median {median:.2f} s over {len(runs)} runs ({walls} s; 1-min load {loads}); "
        f"target ≤ {DRY_RUN_TARGET_S} s: "
        f"{_verdict(median, DRY_RUN_TARGET_S)}. Jobs planned: "
        + ", ".join(f"{rule} {count}" for rule, count in jobs.items())
        + ".",
        "",
    ]


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def plot(rows, medians, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(rows["case"]))
    timed = rows[rows["kind"] == "timed"]
    metrics = (("wall_s", "wall time (s)", 1), ("peak_rss_process_bytes", "peak RSS, largest process (MiB)", MIB))
    figure, axes = plt.subplots(
        len(metrics), len(cases), figsize=(max(5.0, 3.2 * len(cases) + 0.5), 6.5), squeeze=False
    )
    for column, case in enumerate(cases):
        for row, (key, label, scale) in enumerate(metrics):
            axis = axes[row][column]
            for position, tool in enumerate(TOOLS):
                runs = timed[(timed["case"] == case) & (timed["tool"] == tool)][key] / scale
                if runs.empty:
                    continue
                axis.bar(position, runs.median(), color=COLORS[tool], width=0.6, label=tool)
                axis.scatter([position] * len(runs), runs, color="black", s=10, zorder=3)
                axis.annotate(
                    f"{runs.median():.0f}" if runs.median() >= 10 else f"{runs.median():.1f}",
                    (position, runs.max()),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            axis.set_xticks(range(len(TOOLS)), ["ds_to_universal", "ucpflow"], fontsize=8)
            axis.set_ylim(0, axis.get_ylim()[1] * 1.12)
            if column == 0:
                axis.set_ylabel(label)
            if row == 0:
                axis.set_title(case)
    figure.suptitle("bars: median, dots: single runs", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
