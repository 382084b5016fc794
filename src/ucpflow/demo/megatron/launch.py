"""Build, convert and resume the Megatron-shaped toy GPT's checkpoints in subprocesses; no torch is imported here.

Each run starts `tp * pp * dp` CPU processes through the DeepSpeed launcher on a free master port
(other runs may be launching on the same machine) and writes its output to a log file beside its
result; a failed run raises UcpflowError naming that log.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ucpflow.demo.megatron.train import build_parser, check_args
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
DEFAULT_TIMEOUT = 900
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"
# Set by the functions below, not by the caller's options.
RESERVED_OPTIONS = ("tp", "pp", "dp", "save_dir", "resume_universal", "resume_checkpoint", "local_rank")


def build_checkpoint(save_dir, *, tp: int, pp: int, dp: int, timeout: float = DEFAULT_TIMEOUT, **options) -> Path:
    """Train on tp * pp * dp processes and save a DeepSpeed checkpoint into `save_dir`; return its tag folder.

    `options` are train.py's options in Python spelling (steps=3, dtype="fp32", swiglu=True,
    qkv_layout="blocks", universal_info=False, unmatched_pattern=["nothing"], losses_out=path, ...).
    The tag folder is save_dir/global_step{steps}; the launcher's output goes to <save_dir>.log.
    """
    save_dir = Path(save_dir)
    args = _train_args(options, tp=tp, pp=pp, dp=dp, save_dir=save_dir)
    log_path = save_dir.with_name(save_dir.name + ".log")
    _launch(args, log_path, timeout, f"building the checkpoint in {save_dir}")
    tag_folder = save_dir / f"global_step{args.steps}"
    if not tag_folder.is_dir():
        raise UcpflowError(f"DeepSpeed finished but wrote no {tag_folder}; see {log_path}.")
    return tag_folder


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
    _run(command, output_folder.with_name(output_folder.name + ".log"), timeout,
         f"converting {tag_folder} with ds_to_universal")
    return output_folder


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _resume(ckpt_root: Path, mode: str, tp, pp, dp, losses_out: Path, timeout, options) -> list[float]:
    args = _train_args(options, tp=tp, pp=pp, dp=dp, losses_out=losses_out, **{mode: ckpt_root})
    losses_out.unlink(missing_ok=True)
    log_path = losses_out.with_suffix(".log")
    _launch(args, log_path, timeout, f"resuming from {ckpt_root} on tp {tp}, pp {pp}, dp {dp}")
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
    argv = _to_argv({**options, **fixed})
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise UcpflowError(f"Invalid options for the Megatron demo's train.py: {' '.join(argv)}.") from None
    check_args(args)
    return args


def _to_argv(options: dict) -> list[str]:
    argv = []
    for name, value in options.items():
        if name == "local_rank":
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _launch(args, log_path: Path, timeout: float, what: str):
    port = free_port()
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.tp * args.pp * args.dp),
               "--master_port", str(port), str(TRAIN_SCRIPT), *_to_argv(vars(args))]
    try:
        _run(command, log_path, timeout, what)
    finally:
        # DeepSpeed's CPU communication backend leaves a shared-memory buffer of about 70 MB per
        # rank in /dev/shm, named after the master port, and never removes it.
        for buffer in Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_{os.getuid()}_127.0.0.1_{port}_*"):
            buffer.unlink(missing_ok=True)


def _run(command: list[str], log_path: Path, timeout: float, what: str):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        # A session of its own lets a timeout end the launcher together with every rank it started.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise UcpflowError(f"Timed out after {timeout:g} s while {what}; see {log_path}.") from None
    if returncode != 0:
        raise UcpflowError(f"Failed (exit code {returncode}) while {what}{_first_error(log_path)}; see {log_path}.")


def _first_error(log_path: Path) -> str:
    """The log's first Python exception line, e.g. ", first error: AssertionError: ...", or "".

    The first, because once one rank fails the others fail too, on their broken connections.
    """
    exception_line = re.compile(r"^(?:\[rank\d+\]: )?[\w.]*(?:Error|Exception)\b.*")
    with open(log_path, errors="replace") as log:
        for line in log:
            match = exception_line.match(line.strip())
            if match:
                return f", first error: {match.group(0)}"
    return ""
