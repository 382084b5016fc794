"""Two tools side by side on one input: alternating rounds from scratch, medians and ratios, written as
<out>/<name>.json and <out>/<name>.md. Used by the `hf` and `reshard` cases."""

import argparse
import json
import os
import shutil
import statistics
from pathlib import Path

from bench.measure import run_measured
from bench.run import warm_page_cache
from bench.workflow import workflow_fingerprint

MEASURES = ("wall_s", "cpu_s", "peak_rss_process_mib", "peak_rss_tree_mib")
REPO = Path(__file__).resolve().parents[1]


def pair_arguments(description, argv, repeats=3):
    """--repeats, --cache and --out of a side-by-side case (the defaults of `python -m bench`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    return parser.parse_args(argv)


def run_pair(name, anchor, commands, *, source, scratch, out, repeats, check, timeout, described):
    """Run `anchor` and ucpflow `repeats` times each, alternating which goes first; `commands(tool, run_dir)`
    gives a tool's command, `check(run_dirs)` the problems of one round's outputs ([] when right).
    `described` goes into the JSON as what was measured. Returns what the JSON holds: every run, the medians
    ({tool: {measure: value}}) and their ratios, ucpflow / anchor."""
    tools = (anchor, "ucpflow")
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(repeats):
        order = tools if repeat % 2 == 0 else tools[::-1]
        run_dirs = {tool: scratch / f"{tool}{repeat}" for tool in tools}
        for tool in order:
            shutil.rmtree(run_dirs[tool], ignore_errors=True)
            run_dirs[tool].mkdir(parents=True)
            # Both start with the input in the page cache and the previous run's writes flushed to disk.
            warm_page_cache(source)
            os.sync()
            log = out / "logs" / f"{name}-{tool}{repeat}.log"
            measured = run_measured(commands(tool, run_dirs[tool]), log_path=log, cwd=run_dirs[tool], timeout=timeout)
            if measured.returncode != 0:
                raise SystemExit(f"{tool} failed ({measured.returncode}); see {log}")
            rows.append(dict(tool=tool, repeat=repeat, wall_s=round(measured.wall, 2), cpu_s=round(measured.cpu_s, 2),
                             peak_rss_process_mib=round(measured.peak_rss_process / 2**20),
                             peak_rss_tree_mib=round(measured.peak_rss_tree / 2**20), load=os.getloadavg()[0]))
            print(f"[bench.{name}] {rows[-1]}", flush=True)
        problems = check(run_dirs)
        if problems:
            raise SystemExit(f"[bench.{name}] round {repeat}: {problems[:5]}")
        for run_dir in run_dirs.values():
            shutil.rmtree(run_dir)
    median = {tool: {key: statistics.median(row[key] for row in rows if row["tool"] == tool) for key in MEASURES}
              for tool in tools}
    ratios = {key: round(median["ucpflow"][key] / median[anchor][key], 2) for key in MEASURES}
    result = {**described, "workflow": workflow_fingerprint(REPO), "runs": rows,
              "median": median, "ratios": ratios}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| tool | wall s | CPU s | peak RSS, largest process MiB | peak RSS, tree MiB |", "|---|---|---|---|---|"]
    lines += [f"| {tool} | " + " | ".join(str(value) for value in median[tool].values()) + " |" for tool in tools]
    lines.append("| ratio | " + " | ".join(str(value) for value in ratios.values()) + " |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result
