"""The speed targets of issue 22 in one run: every case side by side with its anchor, the ratios against
the targets.

    python -m bench.targets [--repeats N] [--without-gpt355] [--cache DIR] [--out DIR]

| case | anchor | target (ucpflow / anchor, medians) |
|---|---|---|
| `hf_large`: transformers Llama, 551M parameters, ZeRO-3 DP2 bf16, HF Trainer layout (bench.hf) | zero_to_fp32.py --safe_serialization | wall <= 0.6, peak RSS <= 0.1 |
| `hf_tiny`: transformers Llama, 2 layers, hidden 64 (bench.hf) | zero_to_fp32.py --safe_serialization | wall <= 1.5 |
| `many`: 581 parameters, 34 MB (bench.cases) | ds_to_universal | wall <= 1.2 |
| `gpt124`: GPT-2 small, 1.7 GB | ds_to_universal | wall <= 0.35 |
| `gpt355`: GPT-2 medium, 4.7 GB | ds_to_universal | wall <= 0.25 |

Each case runs through bench.pair (alternating rounds from scratch, the input in the page cache, the
previous run's writes flushed), every output checked against the anchor's: universal checkpoints file by
file and tensor by tensor (tests/universal_compare.py), transformers folders tensor by tensor (torch.equal).

The hf export describes a model with transformers once per config and transformers version, and keeps the
description in a cache (ucpflow.export.model_description). The `hf_*` rows are exports with that cache
filled, as for every save of a run after the first (the bench's own cache folder, filled by one untimed
export first); `hf_tiny_first` measures the first export of a model (an empty cache each run), which has no
target of its own. Writes <out>/targets.json and <out>/targets.md, and each case's runs to
<out>/targets-<case>.json and .md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import hf
from bench.cases import CASES, checkpoint_tag_folder
from bench.pair import run_pair
from bench.run import compare_with_anchor
from bench.scaling import command as universal_command
from bench.workflow import snapshot_workflow, workflow_fingerprint

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 3600
# case: ({measure: the most ucpflow / anchor may be}, kind)
TARGETS = {
    "hf_large": ({"wall_s": 0.6, "peak_rss_process_mib": 0.1}, "hf"),
    "hf_tiny": ({"wall_s": 1.5}, "hf"),
    "hf_tiny_first": ({}, "hf"),
    "many": ({"wall_s": 1.2}, "universal"),
    "gpt124": ({"wall_s": 0.35}, "universal"),
    "gpt355": ({"wall_s": 0.25}, "universal"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--without-gpt355", action="store_true", help="leave out the 4.7 GB case")
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    return parser.parse_args(argv)


def with_cache_folder(command, folder):
    """`command` with ucpflow's model-description cache in `folder`."""
    return ["env", f"UCPFLOW_CACHE_DIR={folder}", *command]


def hf_case(name, args, snakefile, scratch):
    case = name.removesuffix("_first")
    tag = hf.checkpoint(args.cache, case)
    _, _, flags = hf.CASES[case]
    descriptions = scratch / "descriptions"
    if name == case:  # fill the description cache once, untimed
        warm = scratch / "warm"
        warm.mkdir()
        subprocess.run(with_cache_folder(hf.commands("ucpflow", tag, warm, snakefile), descriptions), cwd=scratch,
                       check=True, capture_output=True, timeout=TIMEOUT)
        shutil.rmtree(warm)

    def commands(tool, run_dir):
        command = hf.commands(tool, tag, run_dir, snakefile, flags)
        if tool == "zero_to_fp32":
            return command
        return with_cache_folder(command, descriptions if name == case else run_dir / "descriptions")

    def check(run_dirs):
        return hf.outputs_equal(run_dirs["ucpflow"] / "out", run_dirs["zero_to_fp32"] / "out")

    return run_pair(f"targets-{name}", "zero_to_fp32", commands, source=tag, scratch=scratch / "runs", out=args.out,
                    repeats=args.repeats, check=check, timeout=TIMEOUT, described={"case": name, "flags": flags})


def universal_case(name, args, snakefile, scratch):
    tag = checkpoint_tag_folder(CASES[name], args.cache)

    def check(run_dirs):
        output = f"universal/{tag.name}_universal"
        return compare_with_anchor(run_dirs["ucpflow"] / output, run_dirs["ds_to_universal"] / output)

    return run_pair(f"targets-{name}", "ds_to_universal",
                    lambda tool, run_dir: universal_command(tool, tag, run_dir, snakefile), source=tag,
                    scratch=scratch / "runs", out=args.out, repeats=args.repeats, check=check, timeout=TIMEOUT,
                    described={"case": name})


def verdict(name, ratios):
    limits, _ = TARGETS[name]
    met = [ratios[measure] <= limit for measure, limit in limits.items()]
    return "—" if not met else ("met" if all(met) else "not met")


def main(argv=None):
    args = parse_args(argv)
    names = [name for name in TARGETS if not (args.without_gpt355 and name == "gpt355")]
    scratch_root = args.cache / "scratch" / "targets"
    snakefile = snapshot_workflow(REPO, scratch_root / "workflow")
    results = {}
    for name in names:
        scratch = scratch_root / name
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        run = hf_case if TARGETS[name][1] == "hf" else universal_case
        results[name] = run(name, args, snakefile, scratch)
        shutil.rmtree(scratch)
    (args.out / "targets.json").write_text(json.dumps(
        {"workflow": workflow_fingerprint(REPO), "repeats": args.repeats, "cores": os.cpu_count(),
         "cases": {name: {"targets": TARGETS[name][0], "median": result["median"], "ratios": result["ratios"],
                          "verdict": verdict(name, result["ratios"])} for name, result in results.items()}},
        indent=1) + "\n")
    lines = ["| case | anchor wall s | ucpflow wall s | wall ratio | anchor peak RSS MiB | ucpflow peak RSS MiB | "
             "RSS ratio | target | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for name, result in results.items():
        anchor, ours = (result["median"][tool] for tool in result["median"])
        ratios = result["ratios"]
        target = ", ".join(f"{'wall' if m == 'wall_s' else 'RSS'} <= {limit}" for m, limit in TARGETS[name][0].items())
        lines.append(f"| {name} | {anchor['wall_s']} | {ours['wall_s']} | {ratios['wall_s']} | "
                     f"{anchor['peak_rss_process_mib']} | {ours['peak_rss_process_mib']} | "
                     f"{ratios['peak_rss_process_mib']} | {target or '—'} | {verdict(name, ratios)} |")
    (args.out / "targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
