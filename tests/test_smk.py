"""The Snakemake glue of ucpflow.smk: a finished run exits without waiting for Snakemake's timers."""

import threading

from ucpflow.smk import exit_without_waiting


def test_a_finished_workflow_leaves_no_timer_to_wait_for():
    fired = threading.Event()
    timer = threading.Timer(60, fired.set)
    timer.start()
    exit_without_waiting()
    timer.join(5)
    assert not timer.is_alive() and not fired.is_set()
