"""Running a rule's job: its output goes to the rule's log, and a user error ends it with one sentence; and
the memory and time a cluster job asks for."""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .console import JOB_FAILED_STATUS
from .errors import UcpflowError
from .tables import IndexFiles

if TYPE_CHECKING:
    from snakemake.iocontainers import Namedlist, Snakemake

# What a job needs besides the data it holds, and the pessimistic rate its time limit is sized for.
BASE_MEMORY_MB = 512
BASE_RUNTIME_MINUTES = 10
READ_BYTES_PER_SECOND = 50e6


def job_memory_mb(held_bytes: float) -> int:
    """MB for a job that holds `held_bytes` of data at once, plus the interpreter and its libraries."""
    return BASE_MEMORY_MB + math.ceil(held_bytes / 2**20)


def job_runtime_minutes(read_bytes: float) -> int:
    """Minutes for a job that reads `read_bytes` at a pessimistic 50 MB/s, plus start-up."""
    return BASE_RUNTIME_MINUTES + math.ceil(read_bytes / READ_BYTES_PER_SECOND / 60)


# Wildcard names of the rules' paths, each naming one save (ucpflow.targets.SaveTarget.key).
SAVE_WILDCARDS = ("derived", "universal", "hf", "megatron", "reshard", "verify", "inspect_reshard")
# Set (to "1") in the environment of a workflow converting several saves: job lines then name their save.
SAVES_NAMED_ENV = "UCPFLOW_NAME_SAVES"


def _job_name(snakemake):
    """`merge b0003`; with several saves, `merge global_step200 b0003` (the save's folder name first)."""
    wildcards = dict(snakemake.wildcards.items())
    values = [str(value) for key, value in wildcards.items() if key not in SAVE_WILDCARDS]
    if os.environ.get(SAVES_NAMED_ENV):
        saves = [str(value).split("/")[0] for key, value in wildcards.items() if key in SAVE_WILDCARDS]
        values = saves[:1] + values
    return " ".join([snakemake.rule, ", ".join(values)]).strip()


def run(snakemake: Snakemake, main: Callable[[], object], announce: bool = False) -> None:
    """Call `main()` with stdout/stderr sent to the rule's log file.

    A UcpflowError (bad input, bad checkpoint) is reported as one line, both in the log and on the
    terminal; anything else keeps its traceback in the log and gets one line naming the log on the terminal.
    Either way the job exits with status JOB_FAILED_STATUS, whose report the console leaves out (ucpflow.console).
    With `announce`, the text `main()` returns is printed as the job's one line of progress on the terminal (and
    written to the log).
    """
    terminal = sys.__stderr__
    rule = snakemake.rule
    with open(snakemake.log[0], "w") as log:
        sys.stdout = sys.stderr = log
        started = time.perf_counter()
        try:
            result = main()
        except UcpflowError as error:
            message = f"ucpflow error: {error}"
            print(message, file=log)
            print(message, file=terminal)
            sys.exit(JOB_FAILED_STATUS)
        except Exception as error:
            traceback.print_exc(file=log)
            print(f"ucpflow: rule {rule} failed with {type(error).__name__}: {error} (see {snakemake.log[0]})", file=terminal)
            sys.exit(JOB_FAILED_STATUS)
        seconds = time.perf_counter() - started
        print(f"rule {rule} done in {seconds:.2f} s", file=log)
        if announce and result:
            print(result, file=log)
            print(f"ucpflow: {_job_name(snakemake)}: {result} in {seconds:.1f} s", file=terminal, flush=True)


def tell(line: str) -> None:
    """Print `line` on the terminal at once, from inside `run`'s `main()` (whose stdout and stderr go to the log)."""
    print(line, file=sys.__stderr__, flush=True)


class JobFailed(Exception):
    """A job run inside Snakemake's process failed; its one-sentence reason is in the message."""


def run_in_process(log_path: Path | str, function: Callable[..., object], *args: Any) -> None:
    """Run a `run:` job's body in Snakemake's own process; on a UcpflowError, write the sentence to the
    log and raise it as one line (Snakemake prints it with the rule's name) instead of a traceback."""
    try:
        function(*args)
    except UcpflowError as error:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(f"ucpflow error: {error}\n")
        raise JobFailed(f"ucpflow error: {error}") from None


def named_index_files(named: Namedlist) -> IndexFiles:
    """The index's files among a job's named inputs or outputs (`layout`, `fragments`, `params`, `info`)."""
    return IndexFiles(*(named.get(key) for key in IndexFiles._fields))


def exit_without_waiting() -> None:
    """Let a finished Snakemake process exit at once (called from onsuccess and onerror).

    Snakemake's job-rate limiter re-arms a one-second `threading.Timer` after each round of job starts, and
    Python waits for such threads before exiting: every run ended up to a second after its last job. Once the
    run is over nothing waits on those timers, so they are cancelled here.
    """
    for thread in threading.enumerate():
        if isinstance(thread, threading.Timer):
            thread.cancel()
