"""`snakemake hf` against DeepSpeed's `zero_to_fp32.py` on a transformers GPT-2 small (124M parameters, tied
embeddings) that DeepSpeed trained under ZeRO-3 on two CPU processes (DP=2, bf16), saved in the HF Trainer's
folder layout:

    python -m bench.hf [--repeats N] [--cache DIR] [--out DIR]

Each round runs both from scratch (the order alternating): zero_to_fp32.py as the checkpoint folder ships it
(fp32 pytorch_model.bin: its --safe_serialization fails on tied weights), and `snakemake --cores 2 hf` in a
fresh folder (index, extractions, then the export straight from the rank files: fp32 safetensors, no
universal checkpoint). Every output is checked: the same tensors, torch.equal. Writes <out>/hf.json and
<out>/hf.md.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench.measure import run_measured
from bench.run import warm_page_cache
from bench.workflow import snapshot_workflow, workflow_fingerprint

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(model="gpt2", layers=12, hidden=768, heads=12, ffn_hidden=3072, vocab=50257, seq=64, zero_stage=3,
             dtype="bf16", steps=1, dp=2, global_batch=2)
TIMEOUT = 3600


def checkpoint(cache):
    from ucpflow.demo.hftrainer.launch import build_checkpoint

    save_dir = Path(cache) / "checkpoints" / "hf-gpt2-124-z3"
    if not (save_dir / ".complete").is_file():
        shutil.rmtree(save_dir, ignore_errors=True)
        print("[bench.hf] building the GPT-2 124M ZeRO-3 checkpoint with DeepSpeed ...", flush=True)
        build_checkpoint(save_dir, timeout=TIMEOUT, **MODEL)
        (save_dir / ".complete").write_text("ok\n")
    return next(save_dir.glob("checkpoint-*/global_step*"))


def commands(tool, tag, run_dir, snakefile):
    if tool == "zero_to_fp32":
        return [sys.executable, str(tag.parent / "zero_to_fp32.py"), str(tag.parent), str(run_dir / "out")]
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(run_dir), "--cores", "2",
            "hf", "--config", f"input_folder={tag}", f"output_folder={run_dir / 'universal' / (tag.name + '_universal')}",
            f"hf_folder={run_dir / 'out'}", f"work_folder={run_dir / 'work'}"]


def outputs_equal(ours, theirs):
    """Names of tensors that differ (or are missing) between the two exports; [] when equal."""
    import torch
    from safetensors.torch import load_file

    mine = {}
    for path in sorted(ours.glob("*.safetensors")):
        mine.update(load_file(path))
    reference = torch.load(next(theirs.glob("pytorch_model*.bin")), weights_only=False)
    expected = set(reference) - {"lm_head.weight"}
    bad = sorted(expected ^ set(mine))
    return bad + [name for name in sorted(expected & set(mine)) if not torch.equal(mine[name], reference[name])]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=REPO / "bench" / "cache")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = parser.parse_args(argv)
    tag = checkpoint(args.cache)
    scratch = args.cache / "scratch" / "hf"
    snakefile = snapshot_workflow(REPO, scratch / "workflow")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    rows = []
    for repeat in range(args.repeats):
        tools = ("zero_to_fp32", "ucpflow") if repeat % 2 == 0 else ("ucpflow", "zero_to_fp32")
        for tool in tools:
            run_dir = scratch / f"{tool}{repeat}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            warm_page_cache(tag)
            os.sync()
            log = args.out / "logs" / f"hf-{tool}{repeat}.log"
            measured = run_measured(commands(tool, tag, run_dir, snakefile), log_path=log, cwd=run_dir,
                                    timeout=TIMEOUT)
            if measured.returncode != 0:
                raise SystemExit(f"{tool} failed ({measured.returncode}); see {log}")
            rows.append(dict(tool=tool, repeat=repeat, wall_s=round(measured.wall, 2), cpu_s=round(measured.cpu_s, 2),
                             peak_rss_process_mib=round(measured.peak_rss_process / 2**20),
                             peak_rss_tree_mib=round(measured.peak_rss_tree / 2**20), load=os.getloadavg()[0]))
            print(f"[bench.hf] {rows[-1]}", flush=True)
        bad = outputs_equal(scratch / f"ucpflow{repeat}" / "out", scratch / f"zero_to_fp32{repeat}" / "out")
        if bad:
            raise SystemExit(f"the exports differ in {bad[:5]}")
        for tool in tools:
            shutil.rmtree(scratch / f"{tool}{repeat}")
    median = {tool: {key: statistics.median(row[key] for row in rows if row["tool"] == tool)
                     for key in ("wall_s", "cpu_s", "peak_rss_process_mib", "peak_rss_tree_mib")}
              for tool in ("zero_to_fp32", "ucpflow")}
    ratios = {key: round(median["ucpflow"][key] / median["zero_to_fp32"][key], 2) for key in median["ucpflow"]}
    result = {"model": MODEL, "workflow": workflow_fingerprint(REPO), "runs": rows, "median": median, "ratios": ratios}
    (args.out / "hf.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| tool | wall s | CPU s | peak RSS, largest process MiB | peak RSS, tree MiB |", "|---|---|---|---|---|"]
    lines += [f"| {tool} | " + " | ".join(str(value) for value in median[tool].values()) + " |" for tool in median]
    lines.append("| ratio | " + " | ".join(str(value) for value in ratios.values()) + " |")
    (args.out / "hf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
