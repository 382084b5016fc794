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

import shutil
import sys
from pathlib import Path

from bench.pair import pair_arguments, run_pair
from bench.workflow import snapshot_workflow

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
    args = pair_arguments(__doc__, argv, repeats=1)
    tag = checkpoint(args.cache)
    scratch = args.cache / "scratch" / "hf"
    snakefile = snapshot_workflow(REPO, scratch / "workflow")

    def check(run_dirs):
        return outputs_equal(run_dirs["ucpflow"] / "out", run_dirs["zero_to_fp32"] / "out")

    run_pair("hf", "zero_to_fp32", lambda tool, run_dir: commands(tool, tag, run_dir, snakefile), source=tag,
             scratch=scratch, out=args.out, repeats=args.repeats, check=check, timeout=TIMEOUT,
             described={"model": MODEL})


if __name__ == "__main__":
    main()
