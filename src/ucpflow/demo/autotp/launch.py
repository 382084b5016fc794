"""Build and resume AutoTP x ZeRO checkpoints of a tiny Hugging Face model in subprocesses; no torch is imported here.

Each run starts tp * dp CPU processes through the DeepSpeed launcher on a free master port, with its
output in a log file beside its result; a failed run raises UcpflowError naming that log.
"""

import contextlib
import io
import json
import sys
from pathlib import Path

from ucpflow.demo.autotp.train import build_parser, check_args
from ucpflow.demo.launch import MASTER_ADDR, _free_port, _run_logged, _to_argv
from ucpflow.demo.train import remove_shm_allreduce_segments
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
DEFAULT_TIMEOUT = 900
# Set by the functions below, not by the caller's options.
RESERVED_OPTIONS = ("tp", "dp", "zero_stage", "save_dir", "resume_universal", "local_rank")


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
    tag_folder = save_dir / f"global_step{args.steps}"
    if not tag_folder.is_dir():
        raise UcpflowError(f"DeepSpeed finished but wrote no {tag_folder}; see {log_path}.")
    return tag_folder


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
    if not losses_out.is_file():
        raise UcpflowError(f"DeepSpeed finished but wrote no losses to {losses_out}; see {log_path}.")
    return json.loads(losses_out.read_text())


def _train_args(options: dict, **fixed):
    """train.py's namespace, so that a misspelt or invalid option fails before anything is launched."""
    parser = build_parser()
    allowed = set(vars(parser.parse_args([]))) - set(RESERVED_OPTIONS)
    rejected = sorted(set(options) - allowed)
    if rejected:
        raise UcpflowError(f"Option(s) {', '.join(rejected)} cannot be given here; "
                           f"allowed: {', '.join(sorted(allowed))}.")
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            args = parser.parse_args(_to_argv({**options, **fixed}))
        check_args(args)
    except SystemExit:
        reason = complaint.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise UcpflowError(f"Invalid options for the AutoTP demo ({reason}).") from None
    except ValueError as problem:
        raise UcpflowError(f"Invalid options for the AutoTP demo ({problem}).") from None
    return args


def _launch(args, log_path: Path, timeout: float, what: str):
    num_procs = args.tp * args.dp
    port = _free_port()
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
               "--master_addr", MASTER_ADDR, "--master_port", str(port), str(TRAIN_SCRIPT),
               *_to_argv({name: value for name, value in vars(args).items() if name != "local_rank"})]
    try:
        _run_logged(command, log_path, timeout, what)
    finally:
        # The ranks unlink their own segments once all are mapped; a run that died before that
        # point would leave them behind.
        remove_shm_allreduce_segments(MASTER_ADDR, port, range(num_procs))
