"""Run the demo trainer under the DeepSpeed launcher in a subprocess, on CPU, without importing torch here.

Every run gets a free master port (other runs may be launching on the same machine) and its own log
file beside its output; a failed run raises UcpflowError naming that log and quoting its last lines.
"""

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from ucpflow.demo import checkpoint_tag
from ucpflow.demo.train import build_parser, remove_shm_allreduce_segments
from ucpflow.errors import UcpflowError

TRAIN_SCRIPT = Path(__file__).with_name("train.py")
LOG_TAIL_LINES = 30
MASTER_ADDR = "127.0.0.1"
RANK_PREFIX = re.compile(r"^\[rank\d+\]: ")
# "[rank1]: AssertionError: ..." or "ValueError: ..." as Python prints an uncaught exception.
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?([A-Za-z_][\w.]*)?(Error|Exception)\b")
# Set by build_checkpoint and resume_from_universal themselves, not by the caller's options.
PATH_OPTIONS = ("save_dir", "resume_universal", "losses_out")


def build_checkpoint(save_dir, *, num_procs: int = 2, timeout: float = 600, losses_out=None,
                     **train_options) -> Path:
    """Train the demo GPT on `num_procs` processes and save a DeepSpeed checkpoint into `save_dir`.

    `train_options` are train.py's options in Python spelling (zero_stage=3, dtype="fp32",
    freeze=["wpe.weight"], universal_info=False, ...). Returns the tag folder save_dir/global_step{steps};
    the launcher's output goes to <save_dir>.log, the training losses to `losses_out` if given.
    """
    save_dir = Path(save_dir)
    options = _parse_options(train_options, save_dir=save_dir, losses_out=losses_out)
    log_path = save_dir.with_name(save_dir.name + ".log")
    _run_launcher(options, num_procs, log_path, timeout, what=f"building the demo checkpoint in {save_dir}")
    tag_folder = save_dir / checkpoint_tag(options.steps)
    if not tag_folder.is_dir():
        raise UcpflowError(f"DeepSpeed finished but wrote no {tag_folder}; see {log_path}.")
    return tag_folder


def resume_from_universal(ckpt_root, *, num_procs: int, losses_out, timeout: float = 600, **options) -> list[float]:
    """Load the universal checkpoint that ckpt_root/latest_universal names on `num_procs` processes,
    train `steps` more steps and return the loss of each (also written to `losses_out` as JSON).

    `options` are train.py's options as for build_checkpoint; the model options must match the
    checkpoint's. The launcher's output goes to `losses_out` with the suffix .log.
    """
    ckpt_root, losses_out = Path(ckpt_root), Path(losses_out)
    if not (ckpt_root / "latest_universal").is_file():
        raise UcpflowError(f"{ckpt_root} has no latest_universal file; convert a checkpoint with ds_to_universal first.")
    parsed = _parse_options(options, resume_universal=ckpt_root, losses_out=losses_out)
    log_path = losses_out.with_suffix(".log")
    _run_launcher(parsed, num_procs, log_path, timeout, what=f"resuming from the universal checkpoint in {ckpt_root}")
    return json.loads(losses_out.read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((MASTER_ADDR, 0))
        return probe.getsockname()[1]


def _parse_options(options: dict, **paths):
    """train.py's namespace for these options, so that a misspelt or invalid option fails before launching."""
    parser = build_parser()
    known = set(vars(parser.parse_args([]))) - set(PATH_OPTIONS) - {"local_rank"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UcpflowError(f"Unknown demo training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    argv = _to_argv({**options, **paths})
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return parser.parse_args(argv)
    except SystemExit:
        reason = complaint.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise UcpflowError(f"Invalid demo training options ({reason}).") from None


def _to_argv(options: dict) -> list[str]:
    argv = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _namespace_to_argv(args) -> list[str]:
    options = {key: value for key, value in vars(args).items() if key != "local_rank"}
    return _to_argv(options)


def _run_launcher(args, num_procs: int, log_path: Path, timeout: float, what: str):
    port = _free_port()
    command = [sys.executable, "-u", "-m", "deepspeed.launcher.runner", "--num_gpus", str(num_procs),
               "--master_addr", MASTER_ADDR, "--master_port", str(port), str(TRAIN_SCRIPT),
               *_namespace_to_argv(args)]
    try:
        _run_logged(command, log_path, timeout, what)
    finally:
        # The ranks unlink their segments themselves once all are mapped; a run that died before
        # that point would leave them behind.
        remove_shm_allreduce_segments(MASTER_ADDR, port, range(num_procs))


def _run_logged(command: list[str], log_path: Path, timeout: float, what: str):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        # A session of its own lets a timeout end the launcher together with every rank it spawned;
        # the fault handler makes a rank killed by a signal (an abort in C++) print its Python stack.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"})
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise UcpflowError(f"DeepSpeed timed out after {timeout:g} s while {what}; see {log_path}."
                               f"{_log_excerpt(log_path)}") from None
    if returncode != 0:
        raise UcpflowError(f"DeepSpeed failed (exit code {returncode}) while {what}; see {log_path}."
                           f"{_log_excerpt(log_path)}")


def _log_excerpt(log_path: Path) -> str:
    """The first exception a rank raised, if any, and the last lines of the log."""
    with open(log_path, errors="replace") as log:
        lines = log.readlines()
    first_error = _first_error(lines)
    excerpt = f"\nFirst error: {first_error}" if first_error else ""
    return excerpt + "\nLast lines of the log:\n" + "".join(lines[-LOG_TAIL_LINES:])


def _first_error(lines: list[str]):
    for index, line in enumerate(lines):
        if EXCEPTION_LINE.match(line):
            error = _without_rank_prefix(line)
            if ":" not in error:
                # A bare "AssertionError" says nothing without the statement that raised it,
                # the last line above it that is not made of 3.11's ^~~ position markers.
                statements = [_without_rank_prefix(text) for text in lines[max(index - 3, 0):index]]
                statements = [text for text in statements if text.strip("^~ ")]
                if statements:
                    error += f" at {statements[-1]}"
            return error
    return None


def _without_rank_prefix(line: str) -> str:
    return RANK_PREFIX.sub("", line).strip()
