"""How wall time and memory grow with the checkpoint: ucpflow's universal conversion against ds_to_universal
from the demo's 2 MB to a checkpoint over 5 GB, with the fixed cost apart and the I/O floor beside them.

    python -m bench.scaling [--repeats N] [--cache DIR] [--out DIR]

Checkpoints (DeepSpeed, ZeRO-1, DP2, bf16, built on the CPU once and cached like `python -m bench`'s): the
demo (2 layers, hidden 64: the fixed cost, what either tool pays before the data matters), `many` (34 MB),
`gpt44` (6 layers, hidden 512, vocab 50257), `gpt124` (GPT-2 small) and `gpt405` (28 layers, hidden 1024).
For each, both tools run from scratch in alternating order (ds_to_universal with 2 extract and 2 merge
workers, `snakemake --cores 2`), each with the input in the page cache; both outputs must hold the same
files (that their tensors are equal is `python -m bench`'s and the tests' check). The floor is reading
the checkpoint's bytes once from the page cache and writing the universal checkpoint's bytes once (one
process, 8 MiB blocks, then sync).

Each case's runs go to <out>/scaling-<case>.json and .md (bench.pair); the whole to <out>/scaling.json,
<out>/scaling.md and <out>/scaling.png (wall and peak RSS of the largest process
against checkpoint bytes, log-log; dashed: each tool's fixed cost, dotted: the floor).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench.cases import CASES, DEMO, Case, checkpoint_tag_folder
from bench.pair import run_pair
from bench.run import warm_page_cache
from bench.workflow import snapshot_workflow, workflow_fingerprint
from ucpflow.stages.finalize import folder_bytes

REPO = Path(__file__).resolve().parents[1]
SIZES = (
    DEMO,
    CASES["many"],
    Case("gpt44", layers=6, hidden=512, heads=8, vocab=50257),
    CASES["gpt124"],
    Case("gpt405", layers=28, hidden=1024, heads=16, vocab=50257),
)
TOOLS = ("ds_to_universal", "ucpflow")
BLOCK = 8 << 20
TIMEOUT = 3600


def command(tool, tag, run_dir, snakefile):
    output = run_dir / "universal" / f"{tag.name}_universal"
    if tool == "ds_to_universal":
        return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                "--output_folder", str(output), "--num_extract_workers", "2", "--num_merge_workers", "2"]
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(run_dir), "--cores", "2",
            "--config", f"input_folder={tag}", f"output_folder={output}", f"work_folder={run_dir / 'work'}"]


def file_names(folder):
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*") if path.is_file())


def floor_seconds(tag, output_bytes, scratch):
    """Read every file of `tag` once (page cache) and write `output_bytes` once, then sync."""
    warm_page_cache(tag)
    os.sync()
    started = time.perf_counter()
    for path in sorted(Path(tag).iterdir()):
        with open(path, "rb") as handle:
            while handle.read(BLOCK):
                pass
    block, left = bytes(BLOCK), output_bytes
    with open(scratch / "floor.bin", "wb") as handle:
        while left > 0:
            left -= handle.write(block[: min(BLOCK, left)])
    os.sync()
    seconds = time.perf_counter() - started
    (scratch / "floor.bin").unlink()
    return seconds


def measure_case(case, args, snakefile, scratch):
    """Both tools on `case` (bench.pair: alternating rounds from scratch, medians), and the floor."""
    tag = checkpoint_tag_folder(case, args.cache)
    output_bytes = {}

    def check(run_dirs):
        outputs = {tool: run_dirs[tool] / "universal" / f"{tag.name}_universal" for tool in TOOLS}
        if file_names(outputs["ucpflow"]) != file_names(outputs["ds_to_universal"]):
            return [f"{case.name}: the two outputs hold different files"]
        output_bytes["ucpflow"] = folder_bytes(outputs["ucpflow"])
        return []

    measured = run_pair(f"scaling-{case.name}", "ds_to_universal",
                        lambda tool, run_dir: command(tool, tag, run_dir, snakefile), source=tag, scratch=scratch,
                        out=args.out, repeats=args.repeats, check=check, timeout=TIMEOUT,
                        described={"case": case.name})
    result = dict(case=case.name, checkpoint_bytes=folder_bytes(tag), output_bytes=output_bytes["ucpflow"],
                  floor_s=floor_seconds(tag, output_bytes["ucpflow"], scratch))
    for tool in TOOLS:
        result[f"{tool}_wall_s"] = measured["median"][tool]["wall_s"]
        result[f"{tool}_peak_rss_mib"] = measured["median"][tool]["peak_rss_process_mib"]
    print(f"[bench.scaling] {result}", flush=True)
    return result


def plot(results, fixed, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [row for row in results if row["case"] != "demo"]
    sizes = [row["checkpoint_bytes"] / 1e9 for row in data]
    figure, (wall, rss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for tool, colour in zip(TOOLS, ("tab:orange", "tab:blue")):
        wall.plot(sizes, [row[f"{tool}_wall_s"] for row in data], "o-", color=colour, label=tool)
        wall.axhline(fixed[f"{tool}_wall_s"], color=colour, linestyle="--", linewidth=1,
                     label=f"{tool}: fixed cost (demo, 2 MB)")
        rss.plot(sizes, [row[f"{tool}_peak_rss_mib"] for row in data], "o-", color=colour, label=tool)
    wall.plot(sizes, [row["floor_s"] for row in data], "k:", label="floor: read input once, write output once")
    for axes, label in ((wall, "wall time, s"), (rss, "peak RSS of the largest process, MiB")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("checkpoint size, GB")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    wall.legend(fontsize=7)
    rss.legend(fontsize=7)
    figure.suptitle("Universal conversion on 2 cores: ucpflow vs ds_to_universal (medians)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    scratch = args.cache / "scratch" / "scaling"
    scratch.mkdir(parents=True, exist_ok=True)
    snakefile = snapshot_workflow(REPO, scratch / "workflow")
    results = [measure_case(case, args, snakefile, scratch) for case in SIZES]
    fixed = next(row for row in results if row["case"] == "demo")
    (args.out / "scaling.json").write_text(json.dumps(
        {"workflow": workflow_fingerprint(REPO), "repeats": args.repeats, "results": results}, indent=1) + "\n")
    lines = ["| case | checkpoint | ds_to_universal wall s / peak RSS MiB | ucpflow wall s / peak RSS MiB | "
             "wall ratio | RSS ratio | floor s |", "|---|---|---|---|---|---|---|"]
    for row in results:
        lines.append(
            f"| {row['case']} | {row['checkpoint_bytes'] / 1e6:.1f} MB | {row['ds_to_universal_wall_s']:.1f} / "
            f"{row['ds_to_universal_peak_rss_mib']:.0f} | {row['ucpflow_wall_s']:.1f} / {row['ucpflow_peak_rss_mib']:.0f} | "
            f"{row['ucpflow_wall_s'] / row['ds_to_universal_wall_s']:.2f} | "
            f"{row['ucpflow_peak_rss_mib'] / row['ds_to_universal_peak_rss_mib']:.2f} | {row['floor_s']:.1f} |")
    (args.out / "scaling.md").write_text("\n".join(lines) + "\n")
    plot(results, fixed, args.out / "scaling.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
