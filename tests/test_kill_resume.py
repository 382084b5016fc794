"""SIGKILL the whole workflow in each phase, then `--unlock` and the same command: the output equals
ds_to_universal's, nothing half-written is left, and every output finished before the kill is kept.
A merge job killed on its own is started again by Snakemake (config `retries`) and the run succeeds."""

import os
import signal

import pytest
from many_parameters import MERGE_MIN_JOBS, many_parameters  # noqa: F401  (pytest fixture)
from universal_compare import compare_universal

from ucpflow.source.signature import derived_folder
from workflow_runs import (
    UNFINISHED_NAME,
    file_states,
    finished_outputs,
    incomplete_outputs,
    jobs_run,
    kill_session,
    run_workflow,
    running_job_scripts,
    start_workflow,
    unfinished_entries,
    wait_until,
    workflow_command,
)


class Conversion:
    """One conversion's folders and the command that runs it."""

    def __init__(self, root, tag):
        self.root = root
        self.workdir = root / "run"
        self.output = root / "out" / f"{tag.name}_universal"
        self.latest = self.output.parent / "latest_universal"
        self.work = root / "work"
        # Several merge jobs, so that a kill during merging finds some of them finished.
        config = {"input_folder": tag, "output_folder": self.output, "work_folder": self.work,
                  "merge_min_jobs": MERGE_MIN_JOBS}
        self.command = workflow_command(self.workdir, config)

    def derived(self):
        """The work folder's index and maps (named by the input's signature; absent before the index runs)."""
        try:
            return derived_folder(self.work)
        except FileNotFoundError:
            return self.work / "not-indexed-yet"

    def maps(self):
        return list((self.derived() / "extract").glob("*.tsv"))

    def staging_partials(self):
        return list((self.output / "tmp").glob(".b*.partial"))

    def published(self):
        return list((self.output / "zero").glob("*/fp32.pt"))

    def parameter_count(self):
        with open(self.derived() / "index" / "params.tsv") as table:
            return sum(1 for _ in table) - 1

    def finished_merges(self):
        """The staging folders of merge jobs that Snakemake recorded as finished."""
        return [path for path in finished_outputs(self.workdir) if path.parent == self.output / "tmp"]

    def outputs(self):
        """Every file the conversion writes (besides logs), with its inode and mtime."""
        return file_states(self.output, *(self.derived() / name for name in ("index", "extract")))

    def is_temporary(self, path):
        """Staging folders are removed once their parameters are published."""
        return self.output / "tmp" in path.parents


@pytest.fixture(scope="module")
def reference(many_parameters, tmp_path_factory):
    """The checkpoint, DeepSpeed's conversion of it, and the jobs of one uninterrupted ucpflow run."""
    tag, theirs = many_parameters
    root = tmp_path_factory.mktemp("kill-reference")
    full = Conversion(root / "full", tag)
    returncode, output = run_workflow(full.command, root / "full.log")
    assert returncode == 0, output[-3000:]
    return tag, theirs, jobs_run(output)


def _running(process, script):
    return script in running_job_scripts(process.pid).values()


# When to kill, and what must hold at that moment to show the kill came in that phase.
MOMENTS = {
    "index": (
        lambda c, p: _running(p, "index"),
        lambda c: not (c.derived() / "index" / "layout.json").exists(),
    ),
    "extract": (
        lambda c, p: _running(p, "extract") and len(c.maps()) < 3,
        lambda c: len(c.maps()) < 3,
    ),
    "merge": (
        lambda c, p: bool(c.staging_partials()) and bool(c.finished_merges()),
        lambda c: bool(c.staging_partials()),
    ),
    "publish": (
        lambda c, p: len(c.published()) >= 50,
        lambda c: 50 <= len(c.published()) < c.parameter_count(),
    ),
    "finalize": (
        lambda c, p: _running(p, "finalize"),
        lambda c: len(c.published()) == c.parameter_count() and not c.latest.exists(),
    ),
}


def kept_outputs(conversion):
    """Files under their final names at the kill whose job Snakemake had recorded as finished. A
    parameter folder's files count as finished with its fp32.pt, the declared output, and a staging
    folder's files with the folder."""
    finished = finished_outputs(conversion.workdir) - incomplete_outputs(conversion.workdir)
    zero = conversion.output / "zero"
    return {
        path: state
        for path, state in conversion.outputs().items()
        if path in finished
        or (path.parent.parent == zero and path.parent / "fp32.pt" in finished)
        or any(folder in finished for folder in path.parents)
    }


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_resume_after_sigkill(moment, reference, tmp_path):
    tag, theirs, full_jobs = reference
    conversion = Conversion(tmp_path, tag)
    arrived, proof = MOMENTS[moment]

    process = start_workflow(conversion.command, tmp_path / "killed.log")
    wait_until(process, lambda: arrived(conversion, process))
    kill_session(process)
    assert proof(conversion), f"the kill did not come during {moment}"
    unfinished_at_kill = unfinished_entries(conversion.output.parent)
    before = kept_outputs(conversion)

    returncode, output = run_workflow(conversion.command + ["--unlock"], tmp_path / "unlock.log")
    assert returncode == 0, output[-3000:]
    returncode, output = run_workflow(conversion.command, tmp_path / "resumed.log")
    assert returncode == 0, output[-3000:]

    assert compare_universal(conversion.output, theirs, conversion.latest, theirs.parent / "latest_universal") == []
    assert unfinished_entries(conversion.output.parent) == []
    assert not (conversion.output / "tmp").exists()
    after = conversion.outputs()
    changed = [str(p) for p, state in before.items() if p in after and after[p] != state]
    vanished = [str(p) for p in before if p not in after and not conversion.is_temporary(p)]
    assert changed == [] and vanished == []
    resumed_jobs = jobs_run(output)
    print(
        f"\nkill during {moment}: {len(unfinished_at_kill)} unfinished entries at the kill, "
        f"{len(before)} finished files kept; resumed run did {resumed_jobs.total()} of "
        f"{full_jobs.total()} jobs: {dict(resumed_jobs)}"
    )
    if moment == "merge":
        assert resumed_jobs["index"] == 0 and resumed_jobs["extract"] == 0
        # A finished merge's parameters are kept: staged, or already published (its staging folder then gone).
        merged = (conversion.output / "tmp", conversion.output / "zero")
        assert any(folder in path.parents for path in before for folder in merged), "a finished merge is kept"
        assert 1 <= resumed_jobs["merge"] < full_jobs["merge"]


def test_killed_merge_job_is_retried(reference, tmp_path):
    tag, theirs, _ = reference
    conversion = Conversion(tmp_path, tag)
    process = start_workflow(conversion.command, tmp_path / "run.log")
    merges = []

    def merge_under_way():
        merges[:] = [pid for pid, script in running_job_scripts(process.pid).items() if script == "merge"]
        return bool(merges) and bool(conversion.staging_partials())

    wait_until(process, merge_under_way)
    os.kill(merges[0], signal.SIGKILL)
    assert process.wait(timeout=900) == 0, (tmp_path / "run.log").read_text()[-3000:]

    output = (tmp_path / "run.log").read_text()
    assert "Error in rule merge" in output and "Trying to restart job" in output
    assert compare_universal(conversion.output, theirs, conversion.latest, theirs.parent / "latest_universal") == []
    assert unfinished_entries(conversion.output.parent) == []
    assert not (conversion.output / "tmp").exists()


# A writer killed between writing its temp file and renaming it: os.replace never returns.
KILLED_WRITER = """
import os, sys, time
sys.path.insert(0, {src!r})
from ucpflow import fileio, ptfile

def blocked_replace(*args):
    print("written", flush=True)
    time.sleep(600)

os.replace = blocked_replace
{write}
"""

WRITERS = {
    "write_text": "fileio.write_text(final, 'text')",
    "copy_file": "fileio.copy_file(source, final)",
    # optimizer_state_job: ptfile.save after remove_leftovers
    "ptfile.save": "fileio.remove_leftovers(final); ptfile.save({'step': 1}, final)",
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_writing_an_output_again_removes_what_a_killed_writer_left(writer, tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    from ucpflow import fileio, ptfile

    source, final = tmp_path / "source.bin", tmp_path / "out" / "file.pt"
    source.write_bytes(os.urandom(1 << 16))
    final.parent.mkdir()
    preamble = f"source, final = {str(source)!r}, {str(final)!r}\n"
    code = KILLED_WRITER.format(src=str(REPO / "src"), write=preamble + WRITERS[writer])
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "written\n"
    child.kill()
    child.wait()
    [leftover] = list(final.parent.iterdir())
    assert UNFINISHED_NAME.match(leftover.name)

    exec(WRITERS[writer], {"fileio": fileio, "ptfile": ptfile, "source": source, "final": final})
    assert [p.name for p in final.parent.iterdir()] == [final.name]
