"""Build and resume AutoTP x ZeRO checkpoints of a tiny Hugging Face model in subprocesses; no torch is imported here.

Each run starts tp * dp CPU processes (as the DeepSpeed launcher starts them) on a free master port, with its
output in a log file beside its result; a failed run raises UcpflowError naming that log.
"""

from pathlib import Path

from ucpflow.demo.autotp.train import build_parser, check_args
from ucpflow.demo.launcher import options_to_argv, parse_options, read_losses, run_deepspeed, saved_tag_folder
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
DEFAULT_TIMEOUT = 900
# Set by the functions below, not by the caller's options.
RESERVED_OPTIONS = ("tp", "dp", "zero_stage", "save_dir", "resume_universal")


def build_checkpoint(save_dir, *, tp: int, dp: int, zero_stage: int, dtype: str = "bf16",
                     timeout: float = DEFAULT_TIMEOUT, **options) -> Path:
    """Train on tp * dp processes with AutoTP and ZeRO and save a DeepSpeed checkpoint into `save_dir`;
    return its tag folder save_dir/global_step{steps}.

    `options` are train.py's options in Python spelling (model="phi3", steps=3, losses_out=path, ...).
    The launcher's output goes to <save_dir>.log.
    """
    save_dir = Path(save_dir)
    args = _train_args(options, tp=tp, dp=dp, zero_stage=zero_stage, dtype=dtype, save_dir=save_dir)
    log_path = save_dir.with_name(save_dir.name + ".log")
    _launch(args, log_path, timeout, f"building the AutoTP checkpoint in {save_dir}")
    return saved_tag_folder(save_dir, args.steps, log_path)


def resume_from_universal(ckpt_root, *, tp: int, dp: int, zero_stage: int, losses_out,
                          timeout: float = DEFAULT_TIMEOUT, **options) -> list[float]:
    """Load the universal checkpoint that ckpt_root/latest_universal names on a (possibly different)
    tp * dp layout and ZeRO stage, train `steps` more steps and return their losses (also written
    to `losses_out` as JSON).

    The model options (and dtype) must be those the checkpoint was built with. The launcher's output
    goes to `losses_out` with the suffix .log.
    """
    ckpt_root, losses_out = Path(ckpt_root), Path(losses_out)
    if not (ckpt_root / "latest_universal").is_file():
        raise UcpflowError(f"{ckpt_root} has no latest_universal file; convert its checkpoint with ds_to_universal.")
    args = _train_args(options, tp=tp, dp=dp, zero_stage=zero_stage, resume_universal=ckpt_root,
                       losses_out=losses_out)
    losses_out.unlink(missing_ok=True)
    log_path = losses_out.with_suffix(".log")
    _launch(args, log_path, timeout, f"resuming from {ckpt_root} on tp {tp}, dp {dp}, ZeRO stage {zero_stage}")
    return read_losses(losses_out, log_path)


def _train_args(options: dict, **fixed):
    args = parse_options(build_parser(), options, reserved=RESERVED_OPTIONS, what="the AutoTP demo", **fixed)
    try:
        check_args(args)
    except ValueError as problem:
        raise UcpflowError(f"Invalid options for the AutoTP demo ({problem}).") from None
    return args


def _launch(args, log_path: Path, timeout: float, what: str):
    run_deepspeed(TRAIN_SCRIPT, options_to_argv(vars(args)), num_procs=args.tp * args.dp, log_path=log_path,
                  timeout=timeout, what=what)
