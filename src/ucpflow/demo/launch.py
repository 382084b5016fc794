"""Run the demo trainer on CPU ranks (started as DeepSpeed's launcher starts them), without importing torch here.

Every run gets a free master port (other runs may be launching on the same machine) and its own log
file beside its output; a failed run raises UcpflowError naming that log and quoting its last lines.
"""

from pathlib import Path

from ucpflow.demo.launcher import options_to_argv, parse_options, read_losses, run_deepspeed, saved_tag_folder
from ucpflow.demo.train import build_parser
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
# Set by build_checkpoint and resume_from_universal themselves, not by the caller's options.
PATH_OPTIONS = ("save_dir", "resume_universal", "losses_out")


def build_checkpoint(save_dir, *, num_procs: int = 2, timeout: float = 600, losses_out=None, log_path=None,
                     **train_options) -> Path:
    """Train the demo GPT on `num_procs` processes and save a DeepSpeed checkpoint into `save_dir`.

    `train_options` are train.py's options in Python spelling (zero_stage=3, dtype="fp32",
    freeze=["wpe.weight"], universal_info=False, ...). Returns the tag folder save_dir/global_step{steps};
    the launcher's output goes to `log_path` (default <save_dir>.log), the training losses to `losses_out` if given.
    """
    save_dir = Path(save_dir)
    options = parse_options(build_parser(), train_options, reserved=PATH_OPTIONS, what="the demo trainer",
                            save_dir=save_dir, losses_out=losses_out)
    log_path = Path(log_path) if log_path else save_dir.with_name(save_dir.name + ".log")
    _launch(options, num_procs, log_path, timeout, f"building the demo checkpoint in {save_dir}")
    return saved_tag_folder(save_dir, options.steps, log_path)


def resume_from_universal(ckpt_root, *, num_procs: int, losses_out, timeout: float = 600, **options) -> list[float]:
    """Load the universal checkpoint that ckpt_root/latest_universal names on `num_procs` processes,
    train `steps` more steps and return the loss of each (also written to `losses_out` as JSON).

    `options` are train.py's options as for build_checkpoint; the model options must match the
    checkpoint's. The launcher's output goes to `losses_out` with the suffix .log.
    """
    ckpt_root, losses_out = Path(ckpt_root), Path(losses_out)
    if not (ckpt_root / "latest_universal").is_file():
        raise UcpflowError(f"{ckpt_root} has no latest_universal file; convert a checkpoint with ds_to_universal first.")
    parsed = parse_options(build_parser(), options, reserved=PATH_OPTIONS, what="the demo trainer",
                           resume_universal=ckpt_root, losses_out=losses_out)
    log_path = losses_out.with_suffix(".log")
    _launch(parsed, num_procs, log_path, timeout, f"resuming from the universal checkpoint in {ckpt_root}")
    return read_losses(losses_out, log_path)


def _launch(args, num_procs: int, log_path: Path, timeout: float, what: str):
    run_deepspeed(TRAIN_SCRIPT, options_to_argv(vars(args)), num_procs=num_procs, log_path=log_path,
                  timeout=timeout, what=what)
