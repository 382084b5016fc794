"""Converting a training run's saves in one DAG (`tags`, `every`; ucpflow.targets): each save equal to
DeepSpeed's own conversion of it, a later run converting only the new save, a deleted save left with one
notice, a truncated save reported while the others convert, and a run stopped by SIGTERM finished by the
next one. The runs are trained by DeepSpeed (saving every step) and by the real HF Trainer."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, ds_to_universal, snakemake
from test_export_hf_transformers import safetensors_state, zero_to_fp32
from snakemake.utils import validate
from test_runs import LONG_AGO, RANK1, age
from universal_compare import compare_universal
from workflow_runs import jobs_run, run_workflow, workflow_command, workflow_env

from ucpflow.source.saves import Save
from ucpflow.config import Settings
from ucpflow.targets import choose_saves, select

DEMO = dict(num_procs=2, zero_stage=1, dtype="bf16")
STEPS = (1, 2, 3, 4)


# ---------------------------------------------------------------- choosing saves (fast tier)


def save(step, state="complete", detail="", holder="/run"):
    tag = f"global_step{step}"
    return Save(tag=tag, step=step, folder=f"{holder}/{tag}", holder=holder, bytes=1, state=state,
                detail=detail)


def tags_of(saves):
    return [item.tag for item in saves]


def test_tags_every_and_the_states_choose_the_saves():
    saves = [save(1), save(2), save(3, "incomplete", "global_step3/x.pt is truncated."), save(4),
             save(5, "being written", "being written: a file of /run/global_step5 was modified 2 s ago.")]
    chosen, notices = choose_saves(saves, "all", 0, "/run")
    assert tags_of(chosen) == ["global_step1", "global_step2", "global_step4"]
    assert notices == ["global_step3: not converted, its files are incomplete: global_step3/x.pt is truncated.",
                       "global_step5: skipped, being written: a file of /run/global_step5 was modified 2 s ago. "
                       "It is converted by a later run."]
    assert tags_of(choose_saves(saves, "all", 2, "/run")[0]) == ["global_step2", "global_step4"]
    assert tags_of(choose_saves(saves, "global_step[12]", 0, "/run")[0]) == ["global_step1", "global_step2"]
    assert tags_of(choose_saves(saves, ["global_step4", "global_step1"], 0, "/run")[0]) == [
        "global_step1", "global_step4"]
    assert tags_of(choose_saves(saves, "global_step2,global_step4", 4, "/run")[0]) == ["global_step4"]
    assert tags_of(choose_saves(saves[:4], "latest", 0, "/run")[0]) == ["global_step4"]
    with pytest.raises(Exception, match="has no save named global_step9; its saves are global_step1, "):
        choose_saves(saves, ["global_step9"], 0, "/run")
    with pytest.raises(Exception, match="names global_step3, which cannot be converted: .* truncated"):
        choose_saves(saves, ["global_step3"], 0, "/run")


def test_the_hf_trainer_checkpoint_folders_answer_to_their_names():
    saves = [save(2, holder="/out/checkpoint-2"), save(4, holder="/out/checkpoint-4")]
    assert tags_of(choose_saves(saves, "checkpoint-4", 0, "/out")[0]) == ["global_step4"]
    assert tags_of(choose_saves(saves, "checkpoint-*", 0, "/out")[0]) == ["global_step2", "global_step4"]


def test_a_run_without_saves_yet_says_so_and_the_folders_are_per_save_roots(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    config = {"input_folder": str(run), "every": 2, "hf_folder": str(tmp_path / "exports")}
    validate(config, schema=str(REPO / "schemas" / "config.schema.yaml"), set_default=True)
    settings = Settings.from_config(config)
    assert (settings.many, settings.output_folder, settings.hf_folder) == (True, str(run), str(tmp_path / "exports"))
    assert settings.latest_universal == str(run / "latest_universal")
    selection = select(config, settings)
    assert selection.saves == ()
    assert selection.notices == (f"no save of {run} is chosen and ready to convert (it holds 0).",)


def test_tags_need_a_run_folder(tmp_path):
    tag = tmp_path / "global_step1"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    result = snakemake(tmp_path / "work", "-n", config={"input_folder": tag, "tags": "all"})
    assert result.returncode != 0
    assert "ucpflow error: Config keys `tags` and `every` choose saves of a run folder, but input_folder is " \
           f"{tag}, a tag folder of one save;" in result.stderr


# ---------------------------------------------------------------- a DeepSpeed run saving every step


@pytest.fixture(scope="module")
def trained_run(deepspeed_checkpoint, tmp_path_factory):
    """(run folder saved by DeepSpeed at steps 1-4, {tag: ds_to_universal's conversion of it})."""
    run = deepspeed_checkpoint("z1_bf16_dp2_every_step", steps=4, save_every=1, **DEMO).parent
    references = tmp_path_factory.mktemp("references")
    theirs = {}
    for step in STEPS:
        tag = f"global_step{step}"
        theirs[tag] = ds_to_universal(run / tag, references / tag / f"{tag}_universal")
    return run, theirs


def copy_save(run, destination, step):
    """A finished save as training leaves it: its tag folder, then `latest` naming it (aged: not being written)."""
    shutil.copytree(run / f"global_step{step}", destination / f"global_step{step}")
    (destination / "latest").write_text(f"global_step{step}")
    age(destination / f"global_step{step}")
    os.utime(destination / "latest", (LONG_AGO, LONG_AGO))


def equal_to_reference(run, theirs, step):
    tag = f"global_step{step}"
    return compare_universal(run / f"{tag}_universal", theirs[tag]) == []


def test_every_save_of_a_run_then_only_the_new_one(trained_run, tmp_path):
    source, theirs = trained_run
    run = tmp_path / "run"
    run.mkdir()
    for step in (1, 2, 3):
        copy_save(source, run, step)
    # A copy of step 1 with a truncated rank file: reported, and the others convert.
    shutil.copytree(source / "global_step1", run / "global_step0")
    rank1 = run / "global_step0" / RANK1
    os.truncate(rank1, rank1.stat().st_size // 2)
    age(run)
    config = {"input_folder": run, "tags": "all", "work_folder": tmp_path / "work"}
    code, output = run_workflow(workflow_command(tmp_path / "wd", config, "universal", "verify"),
                                tmp_path / "first.log")
    assert code == 0, output[-3000:]
    assert "ucpflow: global_step0: not converted, its files are incomplete: " in output and "truncated" in output
    for step in (1, 2, 3):  # one verify job checks every save
        assert f"ucpflow verify: global_step{step}: 29 parameters: " in output
        assert (tmp_path / "work" / "verify" / f"global_step{step}" / "summary.txt").is_file()
    assert all(equal_to_reference(run, theirs, step) for step in (1, 2, 3))
    assert (run / "latest_universal").read_text() == "global_step3_universal"
    assert jobs_run(output)["index"] == 3 and not (run / "global_step0_universal").exists()

    copy_save(source, run, 4)  # training saved again
    code, output = run_workflow(workflow_command(tmp_path / "wd", config), tmp_path / "second.log")
    assert code == 0, output[-3000:]
    jobs = jobs_run(output)
    assert (jobs["index"], jobs["finalize"], jobs["latest_universal"]) == (1, 1, 1), jobs
    assert equal_to_reference(run, theirs, 4)
    assert (run / "latest_universal").read_text() == "global_step4_universal"

    shutil.rmtree(run / "global_step1")  # the trainer's rotation deleted the oldest save
    result = snakemake(tmp_path / "wd", config=config, check=True)
    assert f"ucpflow: global_step1: its save is gone from {run}; the outputs converted from it stay " \
           f"({run / 'global_step1_universal'})." in result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr
    assert equal_to_reference(run, theirs, 1)

    dry = snakemake(tmp_path / "wd", "-n", config={**config, "every": 2, "output_folder": tmp_path / "every"},
                    check=True)
    planned = dry.stdout + dry.stderr
    assert f"{tmp_path / 'work'}/global_step2/" in planned and f"{tmp_path / 'work'}/global_step4/" in planned
    assert "global_step3/" not in planned


def test_sigterm_stops_a_watch_in_the_middle_and_the_next_run_finishes(trained_run, tmp_path):
    """`python -m ucpflow.watch` converts the run; SIGTERM while it converts stops it at once with nothing
    marked complete that is not; the next run ends equal to ds_to_universal for every save."""
    source, theirs = trained_run
    run = tmp_path / "run"
    run.mkdir()
    for step in STEPS:
        copy_save(source, run, step)
    config = {"input_folder": run, "tags": "all", "merge_min_jobs": 4}
    command = [sys.executable, "-m", "ucpflow.watch", "--seconds", "1", "--",
               *workflow_command(tmp_path / "wd", config)[3:]]
    log = tmp_path / "watch.log"
    with open(log, "w") as handle:
        watch = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=workflow_env(),
                                 cwd=REPO)
    deadline = time.monotonic() + 300
    while not list(run.glob("*_universal/zero/*/fp32.pt")) and time.monotonic() < deadline:
        assert watch.poll() is None, log.read_text()[-3000:]
        time.sleep(0.05)
    watch.send_signal(signal.SIGTERM)
    assert watch.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "ucpflow watch: stopped; a later run converts what is left." in log.read_text()
    assert not (run / "latest_universal").exists()
    code, output = run_workflow(workflow_command(tmp_path / "wd", config, "--rerun-incomplete"), tmp_path / "rerun.log")
    assert code == 0, output[-3000:]
    assert all(equal_to_reference(run, theirs, step) for step in STEPS)
    assert (run / "latest_universal").read_text() == "global_step4_universal"


# ---------------------------------------------------------------- the HF Trainer's output_dir


def test_every_checkpoint_of_an_hf_trainer_run_exported_with_hf(real_trainer_run, tmp_path):
    output_dir = tmp_path / "out"
    shutil.copytree(real_trainer_run, output_dir)
    age(output_dir)
    result = snakemake(tmp_path / "wd", "hf", config={"input_folder": output_dir, "tags": "all"}, check=True)
    checkpoints = sorted(output_dir.glob("checkpoint-*/global_step*"))
    assert len(checkpoints) == 3
    for tag in checkpoints:
        ours = safetensors_state(output_dir / "hf" / tag.name)
        theirs = zero_to_fp32(tag)
        assert ours.keys() == theirs.keys()
        assert all(ours[name].equal(theirs[name]) for name in ours), tag
    assert result.stderr.count("ucpflow: wrote ") == 3
