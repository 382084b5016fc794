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
MODEL_OPTIONS = ("layers", "hidden", "heads", "kv_heads", "ffn_hidden", "vocab", "seq", "swiglu", "qkv_layout", "llama")


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

# 8 processes: TP 2 x PP 2 x DP 2, bf16, a Llama-family model (RMSNorm, rotary positions, untied output layer, no
# linear biases, SwiGLU, grouped-query attention) saved as Megatron-DeepSpeed saves it (no QKV sub-parameters).
# 8 heads over 4 key/value heads put two groups on each rank, where the two QKV layouts differ (with one group
# per rank, [q..., k, v] and [Q; K; V] are the same rows).
LLAMA = dict(tp=2, pp=2, dp=2, layers=2, heads=8, kv_heads=4, ffn_hidden=64, swiglu=True, llama=True,
             qkv_sub_params=False, **SMALL)
# Megatron-DeepSpeed before PR #441: each TP slice of the fused QKV per key/value group, [q..., k, v].
LLAMA_PER_GROUP = ("llama_per_group", dict(qkv_layout="interleaved", **LLAMA))
# PR #441 and later: each TP slice as [Q; K; V].
LLAMA_PER_SLICE = ("llama_per_slice", dict(qkv_layout="blocks", **LLAMA))
