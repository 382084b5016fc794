"""The workflow as a separate process that a test can watch and SIGKILL, and what a run did.

`start_workflow` runs Snakemake in its own session, so that `kill_session` takes down Snakemake and
every job process it started at once, as a crash or an `scancel` of the submitting job would.
"""

import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

FINISHED_JOB = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", re.MULTILINE)
# Snakemake runs a `script:` job as `python <workdir>/.snakemake/scripts/tmpXXXXXXXX.<script name>`.
JOB_SCRIPT = re.compile(r"/\.snakemake/scripts/tmp[^/.]+\.(\w+)\.py$")
# Names under which ucpflow builds an output before renaming it into place (fileio, ptfile.save, publishing).
UNFINISHED_NAME = re.compile(r"^\..+\.(partial(\..*)?|tmp|publish|publishing)$")


def workflow_env():
    """The environment of a test's Snakemake: jobs must find this interpreter's packages."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


# The tests read Snakemake's own job lines, which the default profile keeps quiet.
SHOW_JOBS = ("--quiet", "host")


def workflow_command(workdir, config, *args, cores=2):
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", str(cores), *args, *SHOW_JOBS]
    return command + ["--config", *(f"{key}={value}" for key, value in config.items())]


def run_workflow(command, log_path, timeout=900):
    """Run to the end; Snakemake's output goes to `log_path`. Returns (returncode, output)."""
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=workflow_env(), timeout=timeout)
    return result.returncode, Path(log_path).read_text()


def start_workflow(command, log_path):
    log = open(log_path, "w")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=workflow_env(),
                                start_new_session=True)
    finally:
        log.close()


def wait_until(process, condition, timeout=300, poll_seconds=0.002):
    """Poll `condition()` until it is true; fail if the workflow ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the workflow ended (exit {process.returncode}) before the awaited moment")
        time.sleep(poll_seconds)
    raise AssertionError(f"the awaited moment did not come within {timeout} s")


def kill_session(process):
    """SIGKILL Snakemake and every process of its session (job scripts, shell commands)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in session_processes(process.pid):
        os.kill(pid, signal.SIGKILL)


def _proc_stat(pid):
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return {"ppid": int(fields[1]), "session": int(fields[3])}


def session_processes(session):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if _proc_stat(entry.name)["session"] == session:
                    found.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
    return found


def process_arguments(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def running_job_scripts(session):
    """{pid: script name} of the `script:` jobs running in the workflow's session."""
    running = {}
    for pid in session_processes(session):
        for argument in process_arguments(pid):
            match = JOB_SCRIPT.search(argument)
            if match:
                running[pid] = match.group(1)
    return running


def jobs_run(output):
    """How many jobs of each rule a Snakemake run finished, from its log (the `all` target left out)."""
    counts = Counter(FINISHED_JOB.findall(output))
    counts.pop("all", None)
    return counts


def file_states(*folders):
    """{path: (inode, mtime_ns)} of every file under `folders`."""
    states = {}
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                info = path.stat()
                states[path] = (info.st_ino, info.st_mtime_ns)
    return states


def unfinished_entries(folder):
    """Files and folders under `folder` whose name marks an output still being built."""
    return sorted(p for p in Path(folder).rglob("*") if UNFINISHED_NAME.match(p.name))


def incomplete_outputs(workdir):
    """Outputs Snakemake had marked as being written (its .snakemake/incomplete records) when it died."""
    return _recorded_paths(workdir, "incomplete")


def finished_outputs(workdir):
    """Outputs of jobs that Snakemake recorded as finished (its .snakemake/metadata records)."""
    return _recorded_paths(workdir, "metadata")


def _recorded_paths(workdir, kind):
    """Snakemake names each record by the urlsafe base64 of the output path, split into '@'-prefixed parts."""
    root = Path(workdir) / ".snakemake" / kind
    outputs = set()
    # os.walk, unlike rglob, shrugs off folders that a running Snakemake removes meanwhile.
    for folder, _, names in os.walk(root):
        for name in names:
            parts = (Path(folder) / name).relative_to(root).parts
            try:
                path = Path(base64.urlsafe_b64decode("".join(part.lstrip("@") for part in parts)).decode())
            except ValueError:  # not a record, e.g. a migration marker
                continue
            outputs.add(path if path.is_absolute() else Path(workdir) / path)
    return outputs
