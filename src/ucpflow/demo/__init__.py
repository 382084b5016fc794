"""Real DeepSpeed checkpoints of a tiny GPT, built by launching DeepSpeed on CPU, and universal resumes.

Importing this package is cheap: torch and DeepSpeed are imported only by the processes that train.
"""

# What the workflow builds when no checkpoint is configured: ZeRO-1, bf16, two processes, so the
# checkpoint has bf16_ optimizer shards, a padded flat partition (vocab 500) and the tag global_step4.
DEFAULT_DEMO_SPEC = {
    "num_procs": 2,
    "zero_stage": 1,
    "dtype": "bf16",
    "layers": 2,
    "hidden": 64,
    "heads": 4,
    "vocab": 500,
    "seq_len": 32,
    "steps": 4,
}


def checkpoint_tag(steps: int) -> str:
    """The tag DeepSpeed's save_checkpoint gives a run after `steps` optimizer steps."""
    return f"global_step{steps}"
