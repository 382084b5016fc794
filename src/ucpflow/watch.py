"""Keep a run's saves converted while training goes on: run the workflow, then again whenever a save of the
run folder appears, finishes or goes away, until SIGINT or SIGTERM.

    python -m ucpflow.watch --seconds 60 -- hf --cores 4 --config input_folder=RUN tags=all
    python -m ucpflow.watch --seconds 60 -- universal --workflow-profile profiles/slurm --config input_folder=RUN tags=all

Everything after `--` is Snakemake's command line (the Snakefile beside this package is used unless it names
one with -s). Between runs the run folder's saves are listed every `--seconds` (metadata only); each run
converts the new saves and leaves the finished ones alone, and skips a save still being written, which a
later run converts once it is complete.

On SIGINT or SIGTERM a running Snakemake is stopped as Ctrl-C stops it (its running jobs are cancelled, and
no output's completion marker is written for anything unfinished), with Ctrl-C again every few seconds
while it is still running (Snakemake ignores one that comes while it writes a log line); the next run, of
this watch or by hand, converts the rest. The exit status is 0 after a signal, else Snakemake's status
when a run fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .errors import UcpflowError
from .source.saves import list_saves

SNAKEFILE = Path(__file__).resolve().parents[2] / "Snakefile"
# Snakemake drops a KeyboardInterrupt that arrives while it writes a log line (its log handler catches it):
# a Snakemake still running this long after the last SIGINT gets another.
INTERRUPT_AGAIN_SECONDS = 3.0


def run_folder_of(snakemake_args: Sequence[str]) -> str:
    """The input_folder given in Snakemake's `--config` arguments (relative to its --directory, if given)."""
    arguments = list(snakemake_args)
    directory = next((arguments[i + 1] for i, item in enumerate(arguments[:-1]) if item in ("-d", "--directory")), "")
    for argument in arguments:
        if argument.startswith("input_folder="):
            return os.path.join(directory, argument.split("=", 1)[1])
    raise UcpflowError("ucpflow.watch needs the run folder: add --config input_folder=RUN_FOLDER tags=all.")


def saves_state(run_folder: str) -> tuple:
    """What a new run would see: every save's tag folder and state (being written, incomplete, complete)."""
    return tuple((save.folder, save.state) for save in list_saves(run_folder))


class Watch:
    """Runs Snakemake when the run folder's saves change; stop() ends the wait and the running Snakemake."""

    def __init__(self, snakemake_args: Sequence[str], seconds: float):
        self.command = [sys.executable, "-m", "snakemake", *snakemake_args]
        if "-s" not in snakemake_args and "--snakefile" not in snakemake_args:
            self.command[3:3] = ["-s", str(SNAKEFILE)]
        self.run_folder = run_folder_of(snakemake_args)
        self.seconds = seconds
        self.stopped = threading.Event()
        self.process: subprocess.Popen | None = None
        self.interrupted_at = 0.0

    def stop(self, signum: int = signal.SIGTERM, frame: object = None) -> None:
        self.stopped.set()
        self._interrupt()

    def _interrupt(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT, not SIGTERM: Snakemake's SIGTERM handler takes its scheduler's lock, and hangs for good
            # when the signal comes while the scheduler holds that lock (as it does while it records finished
            # jobs); SIGINT becomes a KeyboardInterrupt, which releases the lock and cancels the jobs.
            self.process.send_signal(signal.SIGINT)
            self.interrupted_at = time.monotonic()

    def run_once(self) -> int:
        # A session of its own: a terminal's Ctrl-C reaches this watch, which stops Snakemake itself.
        self.process = subprocess.Popen(self.command, start_new_session=True)
        while True:
            try:
                returncode = self.process.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if self.stopped.is_set() and time.monotonic() - self.interrupted_at >= INTERRUPT_AGAIN_SECONDS:
                    self._interrupt()
        self.process = None
        return returncode

    def loop(self) -> int:
        seen = None
        while not self.stopped.is_set():
            state = saves_state(self.run_folder)
            if state != seen:
                seen = state
                print(f"ucpflow watch: converting the saves of {self.run_folder}", file=sys.stderr, flush=True)
                returncode = self.run_once()
                if self.stopped.is_set():
                    break
                if returncode != 0:
                    return returncode
                print(f"ucpflow watch: waiting for new saves (every {self.seconds:g} s; Ctrl-C stops)",
                      file=sys.stderr, flush=True)
            self.stopped.wait(self.seconds)
        print("ucpflow watch: stopped; a later run converts what is left.", file=sys.stderr, flush=True)
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucpflow.watch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="how often to look for new saves (default 60)")
    parser.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="-- then Snakemake's arguments")
    args = parser.parse_args(argv)
    snakemake_args = args.snakemake_args[1:] if args.snakemake_args[:1] == ["--"] else args.snakemake_args
    try:
        watch = Watch(snakemake_args, args.seconds)
    except UcpflowError as error:
        print(f"ucpflow error: {error}", file=sys.stderr)
        return 2
    if not os.path.isdir(watch.run_folder):
        print(f"ucpflow error: Config key `input_folder`: {watch.run_folder} does not exist or is not a folder.",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, watch.stop)
    signal.signal(signal.SIGINT, watch.stop)
    return watch.loop()


if __name__ == "__main__":
    sys.exit(main())
