"""`snakemake hf` against DeepSpeed's `zero_to_fp32.py` on a transformers model that DeepSpeed trained under
ZeRO-3 on two CPU processes (DP=2, bf16), saved in the HF Trainer's folder layout:

    python -m bench.hf [--case hf|hf_large|hf_tiny] [--repeats N] [--cache DIR] [--out DIR]

Cases: `hf`, a GPT-2 small (124M parameters, tied embeddings); `hf_large`, a Llama of 551M parameters
(18 layers, hidden 1536, 12 heads with 4 key/value heads, MLP 4096, vocabulary 32000, untied), 6.6 GB of
checkpoint; `hf_tiny`, a Llama of 2 layers, hidden 64 (0.2 MB of checkpoint: what either tool pays
before the data matters). Each round runs both from scratch (the order alternating): zero_to_fp32.py as the checkpoint
folder ships it (`hf`: fp32 pytorch_model.bin, as its --safe_serialization fails on tied weights;
`hf_large`, `hf_tiny`: --safe_serialization), and `snakemake --cores 2 hf` in a fresh folder (index, extractions, then
the export straight from the rank files: fp32 safetensors, no universal checkpoint). Every output is
checked: the same tensors, torch.equal. Writes <out>/<case>.json and <out>/<case>.md.
"""

import argparse
import shutil
import sys
from pathlib import Path

from bench.pair import pair_arguments, run_pair
from bench.workflow import snapshot_workflow

REPO = Path(__file__).resolve().parents[1]
TRAINING = dict(seq=64, zero_stage=3, dtype="bf16", steps=1, dp=2, global_batch=2)
# case: (model options of ucpflow.demo.hftrainer, cached checkpoint's folder, zero_to_fp32.py's flags)
CASES = {
    "hf": (dict(model="gpt2", layers=12, hidden=768, heads=12, ffn_hidden=3072, vocab=50257, **TRAINING),
           "hf-gpt2-124-z3", []),
    "hf_large": (dict(model="llama", layers=18, hidden=1536, heads=12, kv_heads=4, ffn_hidden=4096, vocab=32000,
                      **TRAINING), "hf-llama-551m-z3", ["--safe_serialization"]),
    "hf_tiny": (dict(model="llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn_hidden=128, vocab=500, **TRAINING),
                "hf-llama-tiny-z3", ["--safe_serialization"]),
}
TIMEOUT = 3600


def checkpoint(cache, case):
    from ucpflow.demo.hftrainer.launch import build_checkpoint

    model, name, _ = CASES[case]
    save_dir = Path(cache) / "checkpoints" / name
    if not (save_dir / ".complete").is_file():
        shutil.rmtree(save_dir, ignore_errors=True)
        print(f"[bench.hf] building the {case} checkpoint ({name}) with DeepSpeed ...", flush=True)
        build_checkpoint(save_dir, timeout=TIMEOUT, **model)
        (save_dir / ".complete").write_text("ok\n")
    return next(save_dir.glob("checkpoint-*/global_step*"))


def commands(tool, tag, run_dir, snakefile, flags=()):
    if tool == "zero_to_fp32":
        return [sys.executable, str(tag.parent / "zero_to_fp32.py"), str(tag.parent), str(run_dir / "out"), *flags]
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
    reference = {}
    for path in sorted(theirs.glob("*.safetensors")):
        reference.update(load_file(path))
    for path in sorted(theirs.glob("pytorch_model*.bin")):
        reference.update(torch.load(path, weights_only=False))
    # A tied lm_head.weight is stored once by ucpflow, as save_pretrained does.
    expected = set(reference) - ({"lm_head.weight"} - set(mine))
    bad = sorted(expected ^ set(mine))
    return bad + [name for name in sorted(expected & set(mine)) if not torch.equal(mine[name], reference[name])]


def main(argv=None):
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--case", choices=sorted(CASES), default="hf")
    chosen, rest = chooser.parse_known_args(argv)
    args = pair_arguments(__doc__, rest, repeats=1)
    model, _, flags = CASES[chosen.case]
    tag = checkpoint(args.cache, chosen.case)
    scratch = args.cache / "scratch" / chosen.case
    snakefile = snapshot_workflow(REPO, scratch / "workflow")

    def check(run_dirs):
        return outputs_equal(run_dirs["ucpflow"] / "out", run_dirs["zero_to_fp32"] / "out")

    run_pair(chosen.case, "zero_to_fp32", lambda tool, run_dir: commands(tool, tag, run_dir, snakefile, flags),
             source=tag, scratch=scratch, out=args.out, repeats=args.repeats, check=check, timeout=TIMEOUT,
             described={"case": chosen.case, "model": model, "zero_to_fp32_flags": flags})


if __name__ == "__main__":
    main()
