"""Stopping a watch whose Snakemake ignores the first Ctrl-C (as Snakemake does when the KeyboardInterrupt
comes while it writes a log line): the watch interrupts it again until it exits. Fast tier: a stand-in
process, no Snakemake."""

import sys
import threading
import time

from ucpflow import watch as watch_module
from ucpflow.watch import Watch

# Ignores the first SIGINT, exits on the second; writes one line per SIGINT to the file it is given.
STAND_IN = """
import signal, sys, time
received = open(sys.argv[1], "a")
def on_interrupt(signum, frame):
    received.write("SIGINT\\n")
    received.flush()
    if sum(1 for _ in open(sys.argv[1])) >= 2:
        sys.exit(0)
signal.signal(signal.SIGINT, on_interrupt)
open(sys.argv[2], "w").close()
while True:
    time.sleep(0.05)
"""


def kill_left_over(watch):
    process = watch.process
    if process is not None and process.poll() is None:
        process.kill()


def test_a_snakemake_that_ignored_the_interrupt_is_interrupted_again(tmp_path, monkeypatch):
    monkeypatch.setattr(watch_module, "INTERRUPT_AGAIN_SECONDS", 0.3)
    received, ready = tmp_path / "received", tmp_path / "ready"
    watch = Watch(["--config", f"input_folder={tmp_path}"], seconds=1)
    watch.command = [sys.executable, "-c", STAND_IN, str(received), str(ready)]
    result = {}
    runner = threading.Thread(target=lambda: result.update(returncode=watch.run_once()))
    runner.start()
    deadline = time.monotonic() + 30
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ready.exists(), "the stand-in did not start"

    watch.stop()
    runner.join(timeout=30)
    kill_left_over(watch)

    assert not runner.is_alive(), "the watch did not stop the process that ignored its first interrupt"
    assert result["returncode"] == 0
    assert received.read_text().splitlines() == ["SIGINT", "SIGINT"]
    assert watch.process is None


def test_a_stop_before_snakemake_starts_still_interrupts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(watch_module, "INTERRUPT_AGAIN_SECONDS", 0.3)
    received, ready = tmp_path / "received", tmp_path / "ready"
    watch = Watch(["--config", f"input_folder={tmp_path}"], seconds=1)
    watch.command = [sys.executable, "-c", STAND_IN, str(received), str(ready)]
    watch.stop()  # the signal came between two runs: no process to interrupt yet

    # The stand-in never exits by itself: that run_once returns shows it was interrupted (whether before or
    # after it installed its handler, which a loaded machine decides).
    result = {}
    runner = threading.Thread(target=lambda: result.update(returncode=watch.run_once()))
    runner.start()
    runner.join(timeout=30)
    kill_left_over(watch)
    assert not runner.is_alive(), "a watch stopped before its run began let the run go on"
