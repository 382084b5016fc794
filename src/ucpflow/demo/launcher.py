"""Run a training script on CPU processes as DeepSpeed's single-node launcher does, in subprocesses;
neither torch nor deepspeed is imported here.

Every run gets a free master port (other runs may be launching on the same machine) and its own log
file; a failed run raises UcpflowError naming that log and quoting its first exception and last lines.
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
import time
from pathlib import Path

from ucpflow.demo import checkpoint_tag
from ucpflow.errors import UcpflowError

MASTER_ADDR = "127.0.0.1"
LOG_TAIL_LINES = 30
RANK_PREFIX = re.compile(r"^\[rank\d+\]: ")
# "[rank1]: AssertionError: ..." or "ValueError: ..." as Python prints an uncaught exception.
EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]: )?([A-Za-z_][\w.]*)?(Error|Exception)\b")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((MASTER_ADDR, 0))
        return probe.getsockname()[1]


def options_to_argv(options: dict) -> list[str]:
    """Command-line arguments for options in Python spelling: zero_stage=3 gives --zero-stage 3, a bool
    --flag or --no-flag, a list the flag once per item, None nothing. local_rank is left out: the
    launcher gives each rank its own."""
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


def parse_options(parser, options: dict, *, reserved, what: str, **fixed):
    """The parser's namespace for the caller's `options` and the launch module's own `fixed` ones, so
    that a misspelt, `reserved` or invalid option fails before anything is launched; `what` names the
    trainer in the error, e.g. "the AutoTP demo"."""
    allowed = set(vars(parser.parse_args([]))) - set(reserved) - {"local_rank"}
    rejected = sorted(set(options) - allowed)
    if rejected:
        raise UcpflowError(f"Option(s) {', '.join(rejected)} cannot be given to {what}; "
                           f"allowed: {', '.join(sorted(allowed))}.")
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            return parser.parse_args(options_to_argv({**options, **fixed}))
    except SystemExit:
        reason = complaint.getvalue().strip().splitlines()[-1].partition("error: ")[2]
        raise UcpflowError(f"Invalid options for {what} ({reason}).") from None


def run_deepspeed(script, argv: list[str], *, num_procs: int, log_path: Path, timeout: float, what: str):
    """Run `script` with `argv` on `num_procs` CPU ranks, their output in `log_path`; `what` completes
    the error message "DeepSpeed failed while ...".

    The ranks are started the way `deepspeed --num_gpus N` starts them on one node (the environment
    of deepspeed.launcher.launch and --local_rank=i), without its two launcher processes, each of
    which imports deepspeed (about 2 s apiece) before any rank starts.
    """
    port = free_port()
    try:
        run_ranks(rank_commands(script, argv, num_procs), rank_environments(port, num_procs), log_path, timeout, what)
    finally:
        # The trainers unlink their own segments once all ranks have mapped them; a run that died
        # before that point would leave them behind.
        remove_shm_allreduce_segments(MASTER_ADDR, port, range(num_procs))


def rank_commands(script, argv: list[str], num_procs: int) -> list[list[str]]:
    return [[sys.executable, "-u", str(script), f"--local_rank={rank}", *argv] for rank in range(num_procs)]


def rank_environments(port: int, num_procs: int) -> list[dict[str, str]]:
    """Each rank's environment as deepspeed.launcher.launch sets it for a single node."""
    shared = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", "MASTER_ADDR": MASTER_ADDR,
              "MASTER_PORT": str(port), "WORLD_SIZE": str(num_procs), "LOCAL_SIZE": str(num_procs),
              "CROSS_RANK": "0", "CROSS_SIZE": "1", "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(num_procs)))}
    return [{**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)} for rank in range(num_procs)]


def run_ranks(commands: list[list[str]], environments: list[dict], log_path: Path, timeout: float, what: str):
    """Run one process per rank, all writing to `log_path`; once one fails the others are killed (they
    would wait forever on it), as DeepSpeed's launcher does. Raise UcpflowError on a failure or timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(log_path, "w") as log:
        log.write("\n".join(" ".join(command) for command in commands) + "\n")
        log.flush()
        # A session of its own for each rank lets a failure end it with every process it spawned; the
        # fault handler (in the environment) makes a rank killed by a signal print its Python stack.
        processes = [subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
                     for command, env in zip(commands, environments)]
        failed, timed_out = None, False
        try:
            while any(process.poll() is None for process in processes):
                failed = next((process for process in processes if process.poll() not in (None, 0)), None)
                if failed is not None:
                    break
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
            failed = failed or next((process for process in processes if process.returncode not in (None, 0)), None)
        finally:
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    if timed_out:
        raise UcpflowError(f"DeepSpeed timed out after {timeout:g} s while {what}; see {log_path}."
                           f"{_log_excerpt(log_path)}")
    if failed is not None:
        raise UcpflowError(f"DeepSpeed failed (exit code {failed.returncode}) while {what}; see {log_path}."
                           f"{_log_excerpt(log_path)}")


def run_logged(command: list[str], log_path: Path, timeout: float, what: str):
    """Run `command` with its output in `log_path`, and raise UcpflowError if it fails or outlasts `timeout`."""
    run_ranks([command], [{**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}], log_path, timeout, what)


def saved_tag_folder(save_dir: Path, steps: int, log_path: Path) -> Path:
    """The tag folder a trainer that ran `steps` steps saved into `save_dir`; `log_path` is its run's log."""
    tag_folder = save_dir / checkpoint_tag(steps)
    if not tag_folder.is_dir():
        raise UcpflowError(f"DeepSpeed finished but wrote no {tag_folder}; see {log_path}.")
    return tag_folder


def read_losses(losses_out: Path, log_path: Path) -> list[float]:
    """The per-step losses a trainer wrote to `losses_out` as JSON; `log_path` is its run's log."""
    if not losses_out.is_file():
        raise UcpflowError(f"DeepSpeed finished but wrote no losses to {losses_out}; see {log_path}.")
    return json.loads(losses_out.read_text())


def exit_finished_rank():
    """End a trainer rank whose work is done (outputs written, process group destroyed) at once.

    Left to interpreter shutdown, torch's teardown sometimes aborts a CPU rank ("terminate called
    without an active exception"), and the launcher then fails a run that finished.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def remove_shm_allreduce_segments(master_addr: str, master_port, ranks):
    """Unlink the /dev/shm segments of DeepSpeed's CPU shared-memory all-reduce for these ranks.

    DeepSpeed creates one ~66 MB segment per rank, named after the master address and port, and
    never unlinks it: without this every run leaks them until /dev/shm fills the machine's memory.
    Unlinking a mapped segment is safe; its memory is freed when the last process maps it no more.
    """
    for rank in ranks:
        segment = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
        segment.unlink(missing_ok=True)


def _log_excerpt(log_path: Path) -> str:
    """The first exception a rank raised, if any, and the last lines of the log.

    The first, because once one rank fails the others fail too, on their broken connections.
    """
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
