"""Reruns are correct by construction: after any change to the input, any deletion of outputs or work
files, or a SIGKILL followed by deletions, the same command ends in the conversion of what the input holds
now (equal to ds_to_universal's), and a run that fails leaves no completion marker."""

import csv
import os
import random
import shutil
import stat

import pytest
from conftest import copy_tag, ds_to_universal
from many_parameters import many_parameters  # noqa: F401  (pytest fixture)
from test_kill_resume import MOMENTS, Conversion
from universal_compare import compare_universal
from workflow_runs import SHOW_JOBS, kill_session, run_workflow, start_workflow, unfinished_entries, wait_until

from ucpflow.source.signature import derived_folder

SMALL = dict(num_procs=2, zero_stage=1, dtype="bf16")
DELETION_SEEDS = range(8)


class Run:
    """A conversion of a private copy of a checkpoint, rerun with the same command."""

    def __init__(self, root, tag):
        self.root = root
        self.source = copy_tag(tag, root / "checkpoint")
        self.conversion = Conversion(root, self.source)

    def __getattr__(self, name):
        return getattr(self.conversion, name)

    def run(self, name, expect_success=True):
        returncode, output = run_workflow(self.command, self.root / f"{name}.log")
        assert (returncode == 0) == expect_success, output[-3000:]
        return output

    def matches(self, theirs):
        return compare_universal(self.output, theirs, self.latest, theirs.parent / "latest_universal") == []


def deletable(run, rng):
    """What a user (or a cleanup script) might delete between runs: a few of these, chosen at random."""
    output, work = run.output, run.work
    derived = derived_folder(work) if work.is_dir() else None
    zero = output / "zero"
    params = sorted(p for p in zero.iterdir() if p.is_dir()) if zero.is_dir() else []
    candidates = [output, zero, output / "zero" / "optimizer_state.pt", output / "mp_rank_00_model_states.pt",
                  run.latest, work, run.root / "run" / ".snakemake"]
    candidates += rng.sample(params, min(3, len(params)))
    # After a kill, a parameter folder may still be the empty one Snakemake made for a publish job it started.
    with_files = [p for p in params if any(p.iterdir())]
    candidates += [rng.choice(sorted(p.iterdir())) for p in rng.sample(with_files, min(3, len(with_files)))]
    if derived is not None:
        candidates += [derived, derived / "index", derived / "summary.json"]
        for sub in ("index", "extract", "report"):
            files = sorted((derived / sub).glob("*")) if (derived / sub).is_dir() else []
            candidates += rng.sample(files, min(1, len(files)))
    return rng.sample(candidates, rng.randint(1, 4))


def delete(paths):
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


@pytest.fixture(scope="module")
def small(deepspeed_checkpoint, tmp_path_factory):
    tag = deepspeed_checkpoint("z1_bf16_dp2", **SMALL)
    theirs = ds_to_universal(tag, tmp_path_factory.mktemp("small") / "theirs" / f"{tag.name}_universal")
    return tag, theirs


def test_random_deletions_then_the_same_command(small, tmp_path):
    tag, theirs = small
    run = Run(tmp_path, tag)
    run.run("first")
    kinds = []
    for seed in DELETION_SEEDS:
        rng = random.Random(seed)
        chosen = deletable(run, rng)
        kinds.append(sorted(str(p.relative_to(tmp_path)) for p in chosen))
        delete(chosen)
        run.run(f"seed{seed}")
        assert run.matches(theirs), f"seed {seed}: deleted {kinds[-1]}"
        assert unfinished_entries(run.output.parent) == [] and not (run.output / "tmp").exists()
    print(f"\n{len(kinds)} seeds; deleted: {kinds}")


# A kill during each of the phases that leave files half-done, each followed by other random deletions
# (test_kill_resume kills during every phase, without deletions).
@pytest.mark.parametrize("moment, seed", [("merge", 0), ("publish", 1), ("finalize", 2)])
def test_sigkill_then_deletions_then_the_same_command(moment, seed, many_parameters, tmp_path):
    tag, theirs = many_parameters
    run = Run(tmp_path, tag)
    arrived, proof = MOMENTS[moment]
    process = start_workflow(run.command, tmp_path / "killed.log")
    wait_until(process, lambda: arrived(run.conversion, process))
    kill_session(process)
    assert proof(run.conversion), f"the kill did not come during {moment}"
    assert not run.latest.exists()

    rng = random.Random(seed)
    staged = sorted((run.output / "tmp").glob("b*/*")) if (run.output / "tmp").is_dir() else []
    chosen = deletable(run, rng) + rng.sample(staged, min(2, len(staged)))
    delete(chosen)
    run_workflow(run.command + ["--unlock"], tmp_path / "unlock.log")
    run.run("resumed")

    print(f"\nkill during {moment}, seed {seed}: deleted {sorted(str(p.relative_to(tmp_path)) for p in chosen)}")
    assert run.matches(theirs)
    assert unfinished_entries(run.output.parent) == [] and not (run.output / "tmp").exists()


def test_input_replaced_by_another_save_converts_what_is_there_now(small, many_parameters, tmp_path):
    """Another model (2 layers, not 48) saved under the same tag: re-indexed, converted afresh, and the
    parameter folders of the old model are gone."""
    tag, _ = many_parameters
    other_tag, _ = small
    run = Run(tmp_path, tag)
    run.run("first")
    old_params = {p.name for p in (run.output / "zero").iterdir()}

    shutil.rmtree(run.source)
    shutil.copytree(other_tag, run.source)
    theirs = ds_to_universal(run.source, tmp_path / "theirs" / f"{tag.name}_universal")
    run.run("after-swap")

    assert run.matches(theirs)
    assert old_params - {p.name for p in (theirs / "zero").iterdir()}, "the old model had parameters the new lacks"


def test_a_failed_rerun_leaves_no_marker(small, tmp_path):
    tag, _ = small
    run = Run(tmp_path, tag)
    run.run("first")
    assert run.latest.is_file()
    rank_file = next(run.source.glob("*_optim_states.pt"))
    rank_file.write_bytes(rank_file.read_bytes()[: rank_file.stat().st_size // 2])

    output = run.run("after-truncation", expect_success=False)

    assert "ucpflow error:" in output and rank_file.name in output
    assert not run.latest.exists()


def test_default_console_is_one_line_per_job_of_note_and_no_warnings(small, tmp_path):
    """The default profile's console: no warnings, a line per merge job, and the closing summary; the
    outputs have the modes the user's umask gives."""
    tag, _ = small
    run = Run(tmp_path, tag)
    quiet_command = [part for part in run.command if part not in SHOW_JOBS]
    returncode, output = run_workflow(quiet_command, tmp_path / "quiet.log")

    assert returncode == 0, output[-3000:]
    lines = output.splitlines()
    assert not [line for line in lines if "warn" in line.lower()]
    merges = [line for line in lines if line.startswith("ucpflow: merge b")]
    with open(derived_folder(run.work) / "index" / "params.tsv", newline="") as table:
        buckets = {row["bucket"] for row in csv.DictReader(table, delimiter="\t")}
    assert len(merges) == len(buckets) and all("merged" in line for line in merges)
    [summary] = [line for line in lines if line.startswith("ucpflow: wrote ")]
    assert str(run.output) in summary and "load_universal" in summary and str(run.output.parent) in summary
    assert len(lines) < 60

    written = [run.latest, *run.output.rglob("*")]
    modes = {stat.S_IMODE(path.stat().st_mode) for path in written if path.is_file()}
    folders = {stat.S_IMODE(path.stat().st_mode) for path in written if path.is_dir()}
    umask = os.umask(0o022)
    os.umask(umask)
    assert modes == {0o666 & ~umask} and folders == {0o777 & ~umask}
