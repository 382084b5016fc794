"""Build HF-Trainer-layout checkpoints of a tiny transformers model in subprocesses; no torch is imported here."""

from pathlib import Path

from ucpflow.demo.hftrainer.train import build_parser, trainer_folder
from ucpflow.demo.launcher import options_to_argv, parse_options, run_deepspeed, saved_tag_folder

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
DEFAULT_TIMEOUT = 900


def build_checkpoint(save_dir, *, timeout: float = DEFAULT_TIMEOUT, log_path=None, **options) -> Path:
    """Train on tp * dp CPU processes and save into save_dir/checkpoint-{steps}; return its tag folder
    save_dir/checkpoint-{steps}/global_step{steps}.

    `options` are train.py's options in Python spelling (model="gpt2", zero_stage=1, dtype="fp32",
    freeze=["model.embed_tokens.weight"], tp=2, ...). The launcher's output goes to `log_path` (default
    <save_dir>.log).
    """
    save_dir = Path(save_dir)
    args = parse_options(build_parser(), options, reserved=("save_dir",), what="the HF Trainer demo",
                         save_dir=save_dir)
    log_path = Path(log_path) if log_path else save_dir.with_name(save_dir.name + ".log")
    run_deepspeed(TRAIN_SCRIPT, options_to_argv(vars(args)), num_procs=args.tp * args.dp, log_path=log_path,
                  timeout=timeout, what=f"building the HF Trainer checkpoint in {save_dir}")
    return saved_tag_folder(trainer_folder(save_dir, args.steps), args.steps, log_path)
