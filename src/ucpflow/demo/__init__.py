"""Real DeepSpeed checkpoints of a tiny GPT, built by launching DeepSpeed on CPU, and universal resumes.

Importing this package is cheap: torch and DeepSpeed are imported only by the processes that train.
"""

from ..errors import UcpflowError

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


def check_demo(spec: dict) -> None:
    """Refuse, in one sentence, demo options that the selected kind's trainer cannot build."""
    kind = spec.get("kind", GPT)
    if kind == MEGATRON_LLAMA and spec.get("zero_stage", 1) != 1:
        raise UcpflowError(f"Config key `demo.zero_stage`: the {kind} demo trains with ZeRO stage 1 "
                           f"(Megatron-DeepSpeed's pipeline engine allows no more), not {spec['zero_stage']}.")
    if spec.get("hidden", 64) % spec.get("heads", 4):
        raise UcpflowError(f"Config key `demo.heads`: {spec['heads']} heads do not divide the hidden size "
                           f"{spec['hidden']}.")


def training_line(spec: dict) -> str:
    """The line a demo build prints on the terminal when its training starts."""
    return (f"ucpflow: training the demo checkpoint ({spec.get('kind', GPT)}) on {spec['num_procs']} processes, "
            "about a minute...")


def checkpoint_tag(steps: int) -> str:
    """The tag DeepSpeed's save_checkpoint gives a run after `steps` optimizer steps."""
    return f"global_step{steps}"


# The demos `demo.kind` selects, one per target family: the workflow's own GPT (plain DeepSpeed; `universal`,
# `inspect`, `verify`), a transformers Llama saved as the HF Trainer saves it (`hf` too) and a Megatron-DeepSpeed
# Llama-family GPT (`hf` and `megatron` too).
GPT, HF_LLAMA, MEGATRON_LLAMA = "gpt", "hf_llama", "megatron_llama"
DEMO_KINDS = (GPT, HF_LLAMA, MEGATRON_LLAMA)
# Where a demo is saved unless demo.folder says otherwise (the GPT's folder is the one it has always had).
DEFAULT_DEMO_FOLDERS = {GPT: "demo/checkpoint", HF_LLAMA: "demo/hf_llama", MEGATRON_LLAMA: "demo/megatron_llama"}


def demo_folder(spec: dict) -> str:
    """The folder the demo of `spec` (config key `demo`) is saved into."""
    return spec.get("folder") or DEFAULT_DEMO_FOLDERS[spec.get("kind", GPT)]


def demo_checkpoint_folder(spec: dict) -> str:
    """The folder holding the demo's `latest` file: the demo folder, or the HF Trainer's checkpoint-N inside it."""
    folder = demo_folder(spec)
    if spec.get("kind", GPT) == HF_LLAMA:
        return f"{folder}/checkpoint-{spec['steps']}"
    return folder
