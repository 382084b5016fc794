"""`snakemake reshard` against DeepSpeed's ds_to_universal, both full rewrites of the same checkpoint: the
gpt124 case's checkpoint (GPT-2 small shapes, ZeRO-1, DP2, bf16, built by DeepSpeed and cached by
`python -m bench`) resharded to a native ZeRO-3 checkpoint for 3 ranks:

    python -m bench.reshard [--repeats N] [--cache DIR] [--out DIR]

Each round runs both from scratch (the order alternating): ds_to_universal with 2 extract and 2 merge
workers, and `snakemake --cores 2 reshard` in a fresh folder (index, extraction, then one job per target
rank file, read straight from the source's rank files). Every round checks that the reshard wrote its 3
ranks' files and `latest` and no universal checkpoint. Writes <out>/reshard.json and
<out>/reshard.md.
"""

import sys
from pathlib import Path

from bench.cases import CASES, checkpoint_tag_folder
from bench.pair import pair_arguments, run_pair
from bench.workflow import snapshot_workflow
from ucpflow import dsconst

REPO = Path(__file__).resolve().parents[1]
CASE = "gpt124"
TARGET_DP, TARGET_STAGE = 3, 3
TIMEOUT = 3600


def universal_folder(tag, run_dir):
    return run_dir / "universal" / f"{tag.name}_universal"


def commands(tool, tag, run_dir, snakefile):
    if tool == "ds_to_universal":
        return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag),
                "--output_folder", str(universal_folder(tag, run_dir)), "--num_extract_workers", "2",
                "--num_merge_workers", "2"]
    return [sys.executable, "-m", "snakemake", "-s", str(snakefile), "--directory", str(run_dir), "--cores", "2",
            "reshard", "--config", f"input_folder={tag}", f"output_folder={universal_folder(tag, run_dir)}",
            f"reshard_folder={run_dir / 'reshard'}", f"work_folder={run_dir / 'work'}", f"target_dp={TARGET_DP}",
            f"target_zero_stage={TARGET_STAGE}"]


def reshard_problems(tag, run_dirs):
    """What is wrong with one round's outputs: the target tag folder lacks a rank's files or `latest` (what
    they hold is checked against DeepSpeed itself by tests/test_reshard.py), or the reshard wrote a universal
    checkpoint, which it must not need."""
    ours = run_dirs["ucpflow"]
    problems = [f"the reshard wrote {universal_folder(tag, ours)}"] if universal_folder(tag, ours).exists() else []
    folder = ours / "reshard"
    for suffix in (dsconst.OPTIM_FILE_SUFFIX, dsconst.MODEL_FILE_SUFFIX):
        written = sorted(path.name for path in (folder / tag.name).glob(f"*{suffix}"))
        ranks = sorted(int(name.split(dsconst.ZERO_FILE_PREFIX)[1].split("_")[0]) for name in written)
        if ranks != list(range(TARGET_DP)):
            problems.append(f"the reshard wrote {written}, not one {suffix} file for each of {TARGET_DP} ranks")
    if not (folder / "latest").is_file():
        problems.append("the reshard wrote no `latest`")
    return problems


def main(argv=None):
    args = pair_arguments(__doc__, argv, repeats=3)
    tag = checkpoint_tag_folder(CASES[CASE], args.cache)
    scratch = args.cache / "scratch" / "reshard"
    snakefile = snapshot_workflow(REPO, scratch / "workflow")
    run_pair("reshard", "ds_to_universal", lambda tool, run_dir: commands(tool, tag, run_dir, snakefile), source=tag,
             scratch=scratch, out=args.out, repeats=args.repeats, check=lambda run_dirs: reshard_problems(tag, run_dirs),
             timeout=TIMEOUT, described={"case": CASE, "target_dp": TARGET_DP, "target_zero_stage": TARGET_STAGE})


if __name__ == "__main__":
    main()
