"""The toy Megatron GPT checkpoints that the export tests convert (DeepSpeed on CPU, built once per session
through conftest's megatron_checkpoint fixture), and the workflow runs they share."""

from dataclasses import dataclass
from pathlib import Path

from conftest import convert, snakemake

SMALL = dict(hidden=32, vocab=50, seq=8, steps=2, global_batch=4)
# 4 processes: TP 2 x PP 2, bf16, fused QKV in Megatron's per-head order, tied embeddings.
PER_HEAD_TP2_PP2 = ("export_tp2pp2", dict(tp=2, pp=2, dp=1, layers=4, heads=4, **SMALL))
# 2 processes: TP 2, fp32, fused QKV saved as [Q; K; V] sub-parameters, grouped-query attention, SwiGLU.
BLOCKS_GQA_SWIGLU_TP2 = ("export_tp2_blocks", dict(tp=2, pp=1, dp=1, layers=2, heads=8, kv_heads=4, swiglu=True,
                                                   qkv_layout="blocks", dtype="fp32", **SMALL))
MODEL_OPTIONS = ("layers", "hidden", "heads", "kv_heads", "vocab", "seq", "swiglu", "qkv_layout")


def model_options(case):
    """The GPTConfig options of a case."""
    return {key: value for key, value in case[1].items() if key in MODEL_OPTIONS}


@dataclass(frozen=True)
class Converted:
    """A checkpoint converted by the workflow in `workdir`."""

    workdir: Path
    tag: Path
    universal: Path

    def export(self, target, **config):
        """Run `snakemake <target>` where the checkpoint was converted; return the CompletedProcess."""
        return snakemake(self.workdir, target, config={"input_folder": self.tag, "output_folder": self.universal,
                                                        **config})


def universal_checkpoint(megatron_checkpoint, case, workdir):
    """Build (or reuse) the case's checkpoint and convert it with the workflow."""
    name, spec = case
    tag = megatron_checkpoint(name, **spec)
    universal = workdir / "universal" / f"{tag.name}_universal"
    convert(workdir, tag, universal)
    return Converted(workdir, tag, universal)
