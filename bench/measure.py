"""Running a command while sampling its process tree: wall time, peak RSS, and each process's lifetime."""

import os
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field

import psutil

SAMPLE_INTERVAL = 0.02


@dataclass
class ProcessSpan:
    """One process of the tree as the sampler saw it (times in seconds since the root process started)."""

    pid: int
    ppid: int
    cmdline: list
    started: float  # from the kernel's start time (10 ms resolution), so a late first sample does not delay it
    last_seen: float
    peak_rss: int = 0
    cpu_s: float = 0.0  # user + system time at the last sample


@dataclass
class Measurement:
    root_pid: int
    epoch_started: float  # time.time() when the command was started
    returncode: int
    wall: float
    peak_rss_process: int  # the largest RSS any single process of the tree reached
    peak_rss_tree: int  # the largest sum of RSS over the tree at one sample
    samples: int
    cpu_s: float = 0.0  # user + system time of the command and every descendant it waited for
    spans: list = field(default_factory=list)


class TreeSampler(threading.Thread):
    """Samples the RSS of a process and all its descendants every `interval` seconds until stopped."""

    def __init__(self, root_pid, started, interval=SAMPLE_INTERVAL):
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.started = started
        # Kernel start times are offset by up to a second (the boot time is whole seconds), the same for
        # every process: measure them from the root's, which started when `started` was taken.
        self.root_created = self.root.create_time()
        self.interval = interval
        self.spans = {}
        self.peak_rss_process = 0
        self.peak_rss_tree = 0
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval)

    def stop(self):
        self._stop_event.set()
        self.join()

    def sample(self):
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        now = time.perf_counter() - self.started
        tree_rss = 0
        for process in processes:
            try:
                rss = process.memory_info().rss
                cpu = process.cpu_times()
                # Read every time: a process caught between fork and exec still shows its parent's command.
                cmdline = process.cmdline()
                span = self.spans.get(process.pid)
                if span is None:
                    started = max(0.0, process.create_time() - self.root_created)
                    span = self.spans[process.pid] = ProcessSpan(process.pid, process.ppid(), cmdline, started, now)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            if cmdline:
                span.cmdline = cmdline
            span.last_seen = now
            span.peak_rss = max(span.peak_rss, rss)
            span.cpu_s = cpu.user + cpu.system
            tree_rss += rss
            self.peak_rss_process = max(self.peak_rss_process, rss)
        self.peak_rss_tree = max(self.peak_rss_tree, tree_rss)
        self.samples += 1


def run_measured(command, *, log_path, cwd=None, env=None, timeout=None, interval=SAMPLE_INTERVAL):
    """Run `command` (output to `log_path`) and measure it; the whole process group is killed on timeout."""
    with open(log_path, "w") as log:
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        epoch_started, started = time.time(), time.perf_counter()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
        )
        sampler = TreeSampler(process.pid, started, interval)
        sampler.start()
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            returncode = process.wait()
        except BaseException:
            # Interrupted: the command runs in a session of its own and would outlive us.
            os.killpg(process.pid, signal.SIGKILL)
            raise
        wall = time.perf_counter() - started
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.stop()
    cpu = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)
    spans = sorted(sampler.spans.values(), key=lambda span: span.started)
    return Measurement(
        process.pid,
        epoch_started,
        returncode,
        wall,
        sampler.peak_rss_process,
        sampler.peak_rss_tree,
        sampler.samples,
        cpu,
        spans,
    )


class sampling:
    """Context manager sampling this process and its descendants, e.g. around a call that launches workers."""

    def __init__(self, interval=SAMPLE_INTERVAL):
        self.started = time.perf_counter()
        self.sampler = TreeSampler(os.getpid(), self.started, interval)

    def __enter__(self):
        self.sampler.start()
        return self

    def __exit__(self, *exc_info):
        self.sampler.stop()
        self.wall = time.perf_counter() - self.started
