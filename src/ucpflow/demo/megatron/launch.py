"""Build, convert and resume the Megatron-shaped toy GPT's checkpoints in subprocesses; no torch is imported here.

Each run starts `tp * pp * dp` CPU processes (as the DeepSpeed launcher starts them) on a free master port
(other runs may be launching on the same machine) and writes its output to a log file beside its
result; a failed run raises UcpflowError naming that log.
"""

import sys
from pathlib import Path

from ucpflow.demo.launcher import free_port  # noqa: F401 (this module's public API since before launcher.py)
from ucpflow.demo.launcher import (options_to_argv, parse_options, read_losses, run_deepspeed, run_logged,
                                   saved_tag_folder)
from ucpflow.demo.megatron.train import build_parser, check_args
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
DEFAULT_TIMEOUT = 900
# Set by the functions below, not by the caller's options.
RESERVED_OPTIONS = ("tp", "pp", "dp", "save_dir", "resume_universal", "resume_checkpoint")


def build_checkpoint(save_dir, *, tp: int, pp: int, dp: int, timeout: float = DEFAULT_TIMEOUT, log_path=None,
                     **options) -> Path:
    """Train on tp * pp * dp processes and save a DeepSpeed checkpoint into `save_dir`; return its tag folder.

    `options` are train.py's options in Python spelling (steps=3, dtype="fp32", swiglu=True,
    qkv_layout="blocks", universal_info=False, unmatched_pattern=["nothing"], losses_out=path, ...).
    The tag folder is save_dir/global_step{steps}; the launcher's output goes to `log_path` (default
    <save_dir>.log).
    """
    save_dir = Path(save_dir)
    args = _train_args(options, tp=tp, pp=pp, dp=dp, save_dir=save_dir)
    log_path = Path(log_path) if log_path else save_dir.with_name(save_dir.name + ".log")
    _launch(args, log_path, timeout, f"building the checkpoint in {save_dir}")
    return saved_tag_folder(save_dir, args.steps, log_path)


def resume_from_universal(ckpt_root, *, tp: int, pp: int, dp: int, losses_out, timeout: float = DEFAULT_TIMEOUT,
                          **options) -> list[float]:
    """Load the universal checkpoint that ckpt_root/latest_universal names on a (possibly different)
    tp * pp * dp layout, train `steps` more steps and return their losses (also written to `losses_out`).

    The model options must be those the checkpoint was built with. The launcher's output goes to
    `losses_out` with the suffix .log.
    """
    ckpt_root = Path(ckpt_root)
    if not (ckpt_root / "latest_universal").is_file():
        raise UcpflowError(f"{ckpt_root} has no latest_universal file; convert its checkpoint with ds_to_universal.")
    return _resume(ckpt_root, "resume_universal", tp, pp, dp, Path(losses_out), timeout, options)


def resume_from_checkpoint(ckpt_root, *, tp: int, pp: int, dp: int, losses_out, timeout: float = DEFAULT_TIMEOUT,
                           **options) -> list[float]:
    """Like resume_from_universal, but load the original checkpoint that ckpt_root/latest names, which
    DeepSpeed can only do on the layout that saved it: the reference a universal resume is compared to."""
    ckpt_root = Path(ckpt_root)
    if not (ckpt_root / "latest").is_file():
        raise UcpflowError(f"{ckpt_root} has no latest file, so it holds no DeepSpeed checkpoint to resume from.")
    return _resume(ckpt_root, "resume_checkpoint", tp, pp, dp, Path(losses_out), timeout, options)


def run_ds_to_universal(tag_folder, output_folder=None, *, strict: bool = True,
                        timeout: float = DEFAULT_TIMEOUT) -> Path:
    """Convert with DeepSpeed's own `python -m deepspeed.checkpoint.ds_to_universal`, into
    <tag_folder>_universal unless told otherwise; DeepSpeed then names it in <root>/latest_universal.
    The converter's output goes to <output_folder>.log."""
    tag_folder = Path(tag_folder)
    output_folder = Path(output_folder) if output_folder else tag_folder.with_name(tag_folder.name + "_universal")
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_folder),
               "--output_folder", str(output_folder)]
    if not strict:
        command.append("--no_strict")
    run_logged(command, output_folder.with_name(output_folder.name + ".log"), timeout,
               f"converting {tag_folder} with ds_to_universal")
    return output_folder


def _resume(ckpt_root: Path, mode: str, tp, pp, dp, losses_out: Path, timeout, options) -> list[float]:
    args = _train_args(options, tp=tp, pp=pp, dp=dp, losses_out=losses_out, **{mode: ckpt_root})
    losses_out.unlink(missing_ok=True)
    log_path = losses_out.with_suffix(".log")
    _launch(args, log_path, timeout, f"resuming from {ckpt_root} on tp {tp}, pp {pp}, dp {dp}")
    return read_losses(losses_out, log_path)


def _train_args(options: dict, **fixed):
    args = parse_options(build_parser(), options, reserved=RESERVED_OPTIONS, what="the Megatron demo's train.py",
                         **fixed)
    check_args(args)
    return args


def _launch(args, log_path: Path, timeout: float, what: str):
    run_deepspeed(TRAIN_SCRIPT, options_to_argv(vars(args)), num_procs=args.tp * args.pp * args.dp,
                  log_path=log_path, timeout=timeout, what=what)
