"""`python -m bench`: ucpflow against DeepSpeed's ds_to_universal, side by side, on the same checkpoints.

For every case: build (or reuse) the checkpoint, run each tool once with its temp files kept (to
count them, and to make the anchor output), then run the two tools alternately `--repeats` times each
from scratch, checking every output against the anchor. Before every run the input is read once (so
both tools run on a warm page cache) and the disk is synced.
"""

import argparse
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from bench import report
from bench.cases import CASES, checkpoint_tag_folder
from bench.footprint import Footprint, footprint, inodes
from bench.measure import run_measured
from bench.profile import profile_run
from bench.scale import snakemake_env, time_dry_run
from bench.workflow import snapshot_workflow, workflow_fingerprint
from ucpflow.source.signature import is_signature

REPO = Path(__file__).resolve().parents[1]
DS_TO_UNIVERSAL, UCPFLOW = "ds_to_universal", "ucpflow"
TOOLS = (DS_TO_UNIVERSAL, UCPFLOW)
WORKERS = "2"
STAGING = "tmp"
READ_CHUNK = 64 * 2**20


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cases", default="many,gpt124", help=f"comma-separated cases among {', '.join(CASES)} (default: many,gpt124)"
    )
    parser.add_argument("--with-gpt355", action="store_true", help="add the gpt355 case (4.7 GB checkpoint)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per tool and case (default 3)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=REPO / "bench" / "cache",
        help="built checkpoints and scratch space (default bench/cache)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "out",
        help="results.csv, summary.md, wall_rss.png, logs (default bench/out)",
    )
    parser.add_argument(
        "--dry-run-repeats",
        type=int,
        default=3,
        help="timed `snakemake -n` runs on the synthetic BLOOM index (0 skips it; default 3)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per conversion")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.cases.split(",") if name.strip()]
    if args.with_gpt355 and "gpt355" not in names:
        names.append("gpt355")
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose among {', '.join(CASES)}")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    args.case_names = names
    return args


class CaseBench:
    """The runs of one case, their rows for results.csv and ucpflow's time breakdowns."""

    def __init__(self, case, tag_folder, snakefile, scratch, out, timeout):
        self.case, self.tag_folder, self.snakefile, self.timeout = case, Path(tag_folder), snakefile, timeout
        self.scratch = Path(scratch) / case.name
        self.logs, self.profiles_folder = Path(out) / "logs", Path(out) / "profiles"
        self.rank_files = len(list(self.tag_folder.glob("*_optim_states.pt")))
        self.anchor = self.scratch / "anchor" / "universal" / f"{self.tag_folder.name}_universal"
        self.rows, self.profiles, self.footprints = [], [], {}

    def run(self, repeats):
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        self.measure(DS_TO_UNIVERSAL, "footprint", 0, run_dir=self.anchor.parents[1])
        self.measure(UCPFLOW, "footprint", 0)
        for repeat in range(repeats):
            # Alternate which tool goes first, so a drift in machine load favours neither.
            for tool in (TOOLS if repeat % 2 == 0 else TOOLS[::-1]):
                self.measure(tool, "timed", repeat)
        return self

    def measure(self, tool, kind, repeat, run_dir=None):
        """One conversion; a `footprint` run keeps the temp files to count them (and is not timed for medians)."""
        keep_temp = kind == "footprint"
        run_dir = run_dir or self.scratch / f"{tool}-{kind}{repeat}"
        output = run_dir / "universal" / f"{self.tag_folder.name}_universal"
        work = run_dir / "work"
        run_dir.mkdir(parents=True, exist_ok=True)
        if tool == DS_TO_UNIVERSAL:
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(self.tag_folder),
                "--output_folder",
                str(output),
                "--num_extract_workers",
                WORKERS,
                "--num_merge_workers",
                WORKERS,
            ] + (["--keep_temp_folder"] if keep_temp else [])
        else:
            command = [
                sys.executable,
                "-m",
                "snakemake",
                "-s",
                str(self.snakefile),
                "--directory",
                str(run_dir),
                "--cores",
                WORKERS,
                "--config",
                f"input_folder={self.tag_folder}",
                f"output_folder={output}",
                f"work_folder={work}",
                f"keep_temp_folder={keep_temp}",
            ]
        name = f"{self.case.name}-{tool}-{kind}{repeat}"
        # Every run starts with the input in the page cache and the previous run's writes and
        # deletions flushed to disk.
        warm_page_cache(self.tag_folder)
        os.sync()
        load_before = os.getloadavg()[0]
        print(f"[bench] {name} ...", end=" ", flush=True)
        measured = run_measured(command, log_path=self.logs / f"{name}.log", env=snakemake_env(), timeout=self.timeout)
        load_after = os.getloadavg()[0]
        if measured.returncode != 0:
            raise RuntimeError(f"{tool} failed with exit code {measured.returncode}; see {self.logs / f'{name}.log'}")
        print(
            f"{measured.wall:.1f} s (CPU {measured.cpu_s:.1f} s), peak RSS {measured.peak_rss_process / 2**20:.0f} MiB "
            f"(tree {measured.peak_rss_tree / 2**20:.0f} MiB), load {load_before:.1f}",
            flush=True,
        )

        temp = None
        if keep_temp:
            temp = self.count_temp_files(tool, run_dir, output, work)
            shutil.rmtree(output / STAGING, ignore_errors=True)
        left = outside_output(run_dir, output)
        if tool == UCPFLOW:
            profile = profile_run(measured, work, run_dir / ".snakemake")
            profile.update(case=self.case.name, kind=kind, repeat=repeat)
            self.profiles.append(profile)
            report.write_json(self.profiles_folder / f"{name}.json", profile)
        problems = [] if output == self.anchor else compare_with_anchor(output, self.anchor)
        self.rows.append(
            {
                "case": self.case.name,
                "tool": tool,
                "kind": kind,
                "repeat": repeat,
                "wall_s": round(measured.wall, 3),
                "cpu_s": round(measured.cpu_s, 2),
                "peak_rss_process_bytes": measured.peak_rss_process,
                "peak_rss_tree_bytes": measured.peak_rss_tree,
                "rss_samples": measured.samples,
                "temp_files": temp.files if temp else "",
                "temp_bytes": temp.bytes if temp else "",
                "temp_extra_bytes": temp.extra_bytes if temp else "",
                "left_files": left.files,
                "left_bytes": left.bytes,
                "rank_files": self.rank_files,
                "identical": not problems,
                "problems": " | ".join(problems[:3]),
                "load_1min_before": round(load_before, 2),
                "load_1min_after": round(load_after, 2),
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(measured.epoch_started)),
            }
        )
        if problems:
            print(f"[bench] {name}: output differs from the anchor: {problems[:3]}", flush=True)
        if output != self.anchor:
            shutil.rmtree(run_dir)

    def count_temp_files(self, tool, run_dir, output, work):
        """Files written outside the final output, by category; also kept in self.footprints."""
        output_inodes = inodes(output, skip=STAGING)
        categories = {f"{STAGING}/ inside the output": footprint(output / STAGING, output_inodes)}
        if tool == UCPFLOW:
            for child in sorted(work.iterdir()):
                # The input's tables are in a folder named by its signature: count its parts by name.
                parts = sorted(child.iterdir()) if is_signature(child.name) else [child]
                for part in parts:
                    categories[f"work folder: {part.name}{'/' if part.is_dir() else ''}"] = footprint(part)
            categories[".snakemake/ (Snakemake's records)"] = footprint(run_dir / ".snakemake")
        self.footprints[tool] = categories
        return sum(categories.values(), Footprint())


def outside_output(run_dir, output):
    """What a run leaves on disk besides its output folder and latest_universal."""
    kept = {output.resolve(), (output.parent / "latest_universal").resolve()}
    left = Footprint()
    for entry in run_dir.rglob("*"):
        if entry.is_file() and not any(parent in kept for parent in (entry.resolve(), *entry.resolve().parents)):
            left.files += 1
            left.bytes += entry.stat().st_size
    return left


def warm_page_cache(folder):
    for path in sorted(Path(folder).iterdir()):
        with open(path, "rb") as handle:
            while handle.read(READ_CHUNK):
                pass


def compare_with_anchor(output, anchor):
    sys.path.insert(0, str(REPO / "tests"))
    from universal_compare import compare_universal

    return compare_universal(output, anchor, output.parent / "latest_universal", anchor.parent / "latest_universal")


def main(argv=None):
    args = parse_args(argv)
    # A plain `kill` ends the benchmark through SystemExit, so the running conversion is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    scratch = args.cache / "scratch"
    snakefile = snapshot_workflow(REPO, scratch / "workflow")
    machine = report.machine_info(REPO)
    machine["workflow_fingerprint_at_start"] = workflow_fingerprint(snakefile.parent)
    benches = []
    for name in args.case_names:
        tag_folder = checkpoint_tag_folder(CASES[name], args.cache)
        benches.append(CaseBench(CASES[name], tag_folder, snakefile, scratch, args.out, args.timeout).run(args.repeats))
        shutil.rmtree(scratch / name, ignore_errors=True)
    dry_run = None
    if args.dry_run_repeats > 0:
        print("[bench] snakemake -n on the synthetic BLOOM-176B index ...", flush=True)
        dry_run = time_dry_run(scratch / "bloom", snakefile, args.dry_run_repeats, args.out / "logs")
        shutil.rmtree(scratch / "bloom", ignore_errors=True)
    machine["load_average_at_end"] = os.getloadavg()
    machine["workflow_fingerprint_at_end"] = workflow_fingerprint(REPO)
    report.write_all(args.out, benches, dry_run, machine)
    print(f"[bench] wrote {args.out / 'results.csv'}, {args.out / 'summary.md'}, {args.out / 'wall_rss.png'}")


if __name__ == "__main__":
    main()
