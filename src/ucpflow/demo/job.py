"""The demo stage: a DeepSpeed checkpoint of the demo model that `demo.kind` selects, to convert and export."""

from pathlib import Path

from ..errors import CheckpointError
from ..fileio import atomic_directory
from . import GPT, HF_LLAMA, demo_folder
from .hftrainer import launch as hftrainer_launch
from .launch import build_checkpoint
from .megatron import launch as megatron_launch

# The demo options every kind's trainer takes, under their names in the schema.
MODEL_OPTIONS = ("zero_stage", "dtype", "layers", "hidden", "heads", "vocab", "steps")


def _kv_heads(heads):
    """Grouped-query attention (two query heads per key/value head) where the head count allows it."""
    return heads // 2 if heads % 2 == 0 else heads


def _build(kind, save_dir, spec, log_path):
    """Train the demo of `kind` into `save_dir`; return the tag folder."""
    options = {key: spec[key] for key in MODEL_OPTIONS}
    procs = spec["num_procs"]
    if kind == GPT:
        return build_checkpoint(save_dir, num_procs=procs, log_path=log_path, seq_len=spec["seq_len"], **options)
    if kind == HF_LLAMA:
        # A transformers LlamaForCausalLM on `procs` data-parallel ranks, saved as the HF Trainer saves it.
        return hftrainer_launch.build_checkpoint(
            save_dir, log_path=log_path, model="llama", dp=procs, global_batch=2 * procs, tokenizer=True,
            kv_heads=_kv_heads(spec["heads"]), seq=spec["seq_len"], **options)
    # A Megatron-DeepSpeed Llama-family GPT (RMSNorm, rotary positions, SwiGLU, untied output layer, no linear
    # biases) on `procs` tensor-parallel ranks, its fused QKV saved as [Q; K; V] per slice (PR 441 and later).
    return megatron_launch.build_checkpoint(
        save_dir, tp=procs, pp=1, dp=1, log_path=log_path, llama=True, swiglu=True, qkv_layout="blocks",
        qkv_sub_params=False, kv_heads=_kv_heads(spec["heads"]), seq=spec["seq_len"], **options)


def demo_checkpoint_job(spec: dict, latest_output: str, training_log: str) -> None:
    """Train the demo model of `spec` (config key `demo`) with DeepSpeed and save it; the folder appears complete
    or not at all, and the launcher's output goes to `training_log` (in the work folder's logs, not beside the
    checkpoint)."""
    kind = spec.get("kind", GPT)
    folder = demo_folder(spec)
    with atomic_directory(folder) as staging:
        tag_folder = _build(kind, staging, spec, training_log)
    built = Path(latest_output).parent / tag_folder.name
    print(f"demo checkpoint {built} ({kind}) built with {spec['num_procs']} processes")
    if not Path(latest_output).is_file():
        raise CheckpointError(f"DeepSpeed did not write {latest_output}.")
