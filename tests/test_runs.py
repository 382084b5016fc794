"""Run folders: the saves of a DeepSpeed run folder or an HF Trainer output_dir (ucpflow.source.saves) and
`snakemake inspect` on one, one row per save; other targets keep converting the save `latest` names, and
refuse the HF Trainer's output_dir in one sentence.

The DeepSpeed runs here are copies of cached fixtures. A tag folder copied under another name keeps the step
its model-state files record, so such a save's tag (global_step8) and recorded step (4) differ: the table
shows both, with a note, rather than trusting either."""

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, convert, snakemake
from snakemake.utils import validate

from ucpflow import ptfile
from ucpflow.config import Settings
from ucpflow.errors import CheckpointError
from ucpflow.runs import OutputFolders, runs_table, runs_text, universal_state
from ucpflow.source.saves import (
    BEING_WRITTEN,
    COMPLETE,
    INCOMPLETE,
    is_run_folder,
    is_trainer_output,
    list_saves,
    tag_step,
)

DEMO = dict(num_procs=2, zero_stage=1, dtype="bf16")
GPT2 = dict(model="gpt2", zero_stage=1, dtype="fp32", tokenizer=True)
RANK0 = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
RANK1 = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
LONG_AGO = 1_000_000_000  # a modification time well outside the "being written" window


# ---------------------------------------------------------------- synthetic folders (no DeepSpeed, fast tier)


def fake_tag(folder, name=RANK0):
    """A folder that looks like a tag folder (one empty optimizer file, never a readable checkpoint)."""
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"")
    age(folder)
    return folder


def age(folder):
    """Set every file's and folder's modification time long ago: copies and edits are not saves being written."""
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            os.utime(os.path.join(root, name), (LONG_AGO, LONG_AGO))
    os.utime(folder, (LONG_AGO, LONG_AGO))


def settings(**config):
    validate(config, schema=str(REPO / "schemas" / "config.schema.yaml"), set_default=True)
    return Settings.from_config(config)


def test_a_single_checkpoint_is_not_a_run_folder(tmp_path):
    tag = fake_tag(tmp_path / "run" / "global_step4")
    (tmp_path / "run" / "latest").write_text("global_step4")
    (tmp_path / "run" / "global_step4_universal" / "zero").mkdir(parents=True)  # a conversion is not a save
    (tmp_path / "run" / "reshard").mkdir()
    assert not is_run_folder(tag) and not is_run_folder(tmp_path / "run")
    assert not is_trainer_output(tmp_path / "run")


def test_several_tag_folders_make_a_run_folder_ordered_by_step(tmp_path):
    for step in (10, 2, 9):
        fake_tag(tmp_path / "run" / f"global_step{step}")
    (tmp_path / "run" / "latest").write_text("global_step10")
    assert is_run_folder(tmp_path / "run") and not is_trainer_output(tmp_path / "run")
    saves = list_saves(tmp_path / "run")
    assert [save.step for save in saves] == [2, 9, 10]
    assert {save.holder for save in saves} == {str(tmp_path / "run")}
    # Empty optimizer files: discovery's sentence is each save's reason.
    assert {save.state for save in saves} == {INCOMPLETE}
    assert saves[0].reason == "not a PyTorch file" and RANK0 in saves[0].detail
    assert tag_step("global_step100") == 100 and tag_step("best") is None


def test_the_hf_trainer_output_dir_is_a_run_folder_and_other_targets_refuse_it(tmp_path):
    output_dir = tmp_path / "out"
    for step in (2, 4):
        fake_tag(output_dir / f"checkpoint-{step}" / f"global_step{step}")
        (output_dir / f"checkpoint-{step}" / "latest").write_text(f"global_step{step}")
        (output_dir / f"checkpoint-{step}" / "config.json").write_text("{}")
    fake_tag(output_dir / "checkpoint-6" / "global_step6")  # no `latest` yet: being saved
    assert is_trainer_output(output_dir) and is_run_folder(output_dir)
    assert not is_run_folder(output_dir / "checkpoint-2")
    saves = list_saves(output_dir)
    assert [(save.tag, Path(save.holder).name) for save in saves] == [
        ("global_step2", "checkpoint-2"), ("global_step4", "checkpoint-4"), ("global_step6", "checkpoint-6")]
    assert saves[-1].state == BEING_WRITTEN and "has no `latest` yet" in saves[-1].detail
    chosen = settings(input_folder=str(output_dir))
    assert chosen.run_folder and chosen.unconvertible.startswith("Config key `input_folder`:")
    assert f"such as {output_dir / 'checkpoint-4'}." in chosen.unconvertible  # the newest one with a `latest`
    single = settings(input_folder=str(output_dir / "checkpoint-4"))
    assert not single.run_folder and single.tag_folder == str(output_dir / "checkpoint-4" / "global_step4")


def test_a_deepspeed_run_folder_still_converts_the_save_latest_names(tmp_path):
    for step in (2, 4):
        fake_tag(tmp_path / "run" / f"global_step{step}")
    (tmp_path / "run" / "latest").write_text("global_step2")
    chosen = settings(input_folder=str(tmp_path / "run"))
    assert chosen.run_folder and not chosen.unconvertible
    assert chosen.tag_folder == str(tmp_path / "run" / "global_step2")
    assert chosen.output_folder == str(tmp_path / "run" / "global_step2_universal")


def test_being_written_the_newest_save_not_named_by_latest_or_a_recent_file(tmp_path):
    for step in (2, 4):
        fake_tag(tmp_path / "run" / f"global_step{step}")
    (tmp_path / "run" / "latest").write_text("global_step2")
    newest = list_saves(tmp_path / "run")[-1]
    assert newest.state == BEING_WRITTEN and "still names global_step2" in newest.detail
    (tmp_path / "run" / "latest").write_text("global_step4")
    assert [save.state for save in list_saves(tmp_path / "run")] == [INCOMPLETE, INCOMPLETE]
    os.utime(tmp_path / "run" / "global_step2" / RANK0)  # a file written just now: still growing
    states = [save.state for save in list_saves(tmp_path / "run")]
    assert states == [BEING_WRITTEN, INCOMPLETE]
    assert [save.state for save in list_saves(tmp_path / "run", now=os.path.getmtime(
        tmp_path / "run" / "global_step2" / RANK0) + 60)] == [INCOMPLETE, INCOMPLETE]


def test_a_truncated_file_is_found_from_its_zip_directory(tmp_path):
    path = tmp_path / "x.pt"
    ptfile.save({"a": 1, "b": [2, 3]}, path)
    ptfile.check_container(path)
    os.truncate(path, path.stat().st_size - 30)
    with pytest.raises(CheckpointError, match="truncated"):
        ptfile.check_container(path)


def test_run_inspect_of_a_folder_without_saves_that_can_be_read(tmp_path):
    for step in (2, 4):
        fake_tag(tmp_path / "run" / f"global_step{step}")
    table, notes = runs_table(tmp_path / "run")
    assert list(table["convertible"]) == ["no: not a PyTorch file", "no: being written"]
    assert list(table["converted"]) == ["none", "none"]
    assert "2 saves (1 being written, 1 incomplete)" in runs_text(tmp_path / "run", table, notes)


# ---------------------------------------------------------------- copies of DeepSpeed-trained fixtures


def rename_copy(tag, destination):
    shutil.copytree(tag, destination)
    return destination


@pytest.fixture
def deepspeed_run(deepspeed_checkpoint, tmp_path):
    """run/: global_step2 and global_step4 (trained), global_step6 (a copy of 4 with a truncated rank file),
    global_step8 (a copy of 4 that `latest`, naming global_step4, does not name yet)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(deepspeed_checkpoint("z1_bf16_dp2_step2", steps=2, **DEMO), run / "global_step2")
    step4 = deepspeed_checkpoint("z1_bf16_dp2", **DEMO)
    shutil.copytree(step4, run / "global_step4")
    rank1 = rename_copy(step4, run / "global_step6") / RANK1
    os.truncate(rank1, rank1.stat().st_size // 2)
    rename_copy(step4, run / "global_step8")
    (run / "latest").write_text("global_step4")
    age(run)
    return run


def test_the_saves_of_a_deepspeed_run(deepspeed_run):
    saves = list_saves(deepspeed_run)
    assert [(save.tag, save.step, save.state) for save in saves] == [
        ("global_step2", 2, COMPLETE), ("global_step4", 4, COMPLETE), ("global_step6", 6, INCOMPLETE),
        ("global_step8", 8, BEING_WRITTEN)]
    assert saves[2].reason == "truncated file" and RANK1 in saves[2].detail
    assert [save.recorded_step for save in saves] == [2, 4, 4, 4]
    assert saves[0].layout.dp_degree == 2 and saves[0].dtype == "bf16"
    assert saves[0].bytes == sum(path.stat().st_size for path in (deepspeed_run / "global_step2").iterdir())


def test_converted_outputs_are_read_from_their_markers(deepspeed_run):
    saves = list_saves(deepspeed_run)
    universal = deepspeed_run / "global_step4_universal"
    assert universal_state(universal, saves[1]) == ""
    (universal / "zero" / "wte.weight").mkdir(parents=True)
    (universal / "zero" / "wte.weight" / "fp32.pt").write_bytes(b"")
    (universal / "zero" / "optimizer_state.pt").write_bytes(b"")
    assert universal_state(universal, saves[1]) == "universal (partial)"  # no model-states copy
    (universal / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert universal_state(universal, saves[1]) == "universal (unmarked)"
    assert universal_state(universal, saves[1], per_save=True) == "universal"  # a run's save has its own folder
    (deepspeed_run / "latest_universal").write_text("global_step4_universal")
    assert universal_state(universal, saves[1]) == "universal"
    (deepspeed_run / "megatron").mkdir()
    (deepspeed_run / "megatron" / "latest_checkpointed_iteration.txt").write_text("2")
    (deepspeed_run / "reshard" / "global_step4").mkdir(parents=True)
    (deepspeed_run / "reshard" / "latest").write_text("global_step4")
    (deepspeed_run / "hf").mkdir()
    (deepspeed_run / "hf" / "config.json").write_text("{}")
    table, notes = runs_table(deepspeed_run, OutputFolders(converted_save=str(deepspeed_run / "global_step4")))
    converted = dict(zip(table["tag"], table["converted"]))
    assert converted == {"global_step2": "megatron", "global_step4": "universal, reshard",
                         "global_step6": "none", "global_step8": "none"}
    assert f"{deepspeed_run / 'hf'} holds a transformers export; which save it came from is not recorded." in notes


def test_inspect_of_a_deepspeed_run_folder(deepspeed_run, tmp_path):
    """One real conversion (of global_step2), then `snakemake inspect` on the run folder."""
    convert(tmp_path / "convert", deepspeed_run / "global_step2", deepspeed_run / "global_step2_universal")
    age(deepspeed_run / "global_step2")
    inspect_folder = tmp_path / "inspect"
    result = snakemake(tmp_path / "work", "inspect",
                       config={"input_folder": deepspeed_run, "inspect_folder": inspect_folder}, check=True)
    assert sorted(path.name for path in inspect_folder.iterdir()) == ["runs.csv", "runs.md"]
    table = pd.read_csv(inspect_folder / "runs.csv", keep_default_na=False)
    assert list(table["step"]) == [2, 4, 6, 8]
    assert list(table["state"]) == [COMPLETE, COMPLETE, INCOMPLETE, BEING_WRITTEN]
    assert list(table["convertible"]) == ["yes", "yes", "no: truncated file", "no: being written"]
    assert list(table["converted"]) == ["universal", "none", "none", "none"]
    assert list(table["zero"]) == [1, 1, 1, 1] and list(table["dp"]) == [2, 2, 2, 2]
    assert list(table["dtype"]) == ["bf16"] * 4
    assert list(table["recorded_step"]) == [2, 4, 4, 4]
    text = (inspect_folder / "runs.md").read_text()
    assert text in result.stdout
    assert "| 2 | global_step2 | complete | 1 | 2 | 1 | 1 | bf16 |" in text
    assert f"global_step8: being written: it is the newest save and {deepspeed_run / 'latest'} still names " \
           "global_step4." in text
    assert "global_step8: its tag says step 8, but its model-state files record step 4." in text
    assert not (deepspeed_run / "global_step4_universal").exists(), "inspect must not convert"
    (deepspeed_run / "latest").write_text("global_step8")  # the save finished: listed again, now complete
    snakemake(tmp_path / "work", "inspect", config={"input_folder": deepspeed_run, "inspect_folder": inspect_folder},
              check=True)
    table = pd.read_csv(inspect_folder / "runs.csv", keep_default_na=False)
    assert list(table["state"]) == [COMPLETE, COMPLETE, INCOMPLETE, COMPLETE]


def test_inspect_of_an_hf_trainer_output_dir(trainer_checkpoint, tmp_path):
    tag = trainer_checkpoint("gpt2_z1_fp32", **GPT2)
    output_dir = tmp_path / "out"
    shutil.copytree(tag.parent, output_dir / "checkpoint-2")
    later = shutil.copytree(tag.parent, output_dir / "checkpoint-4")
    (later / "global_step2").rename(later / "global_step4")
    (later / "latest").write_text("global_step4")
    (later / "hf").mkdir()
    (later / "hf" / "config.json").write_text("{}")  # checkpoint-4's own hf folder: its export
    newest = shutil.copytree(tag.parent, output_dir / "checkpoint-6")
    (newest / "global_step2").rename(newest / "global_step6")
    (newest / "latest").unlink()
    age(output_dir)
    table, _ = runs_table(output_dir)
    assert list(table["save"]) == ["checkpoint-2/global_step2", "checkpoint-4/global_step4",
                                   "checkpoint-6/global_step6"]
    assert list(table["state"]) == [COMPLETE, COMPLETE, BEING_WRITTEN]
    assert list(table["converted"]) == ["none", "hf", "none"]
    assert list(table["dtype"]) == ["fp32"] * 3
    inspect_folder = tmp_path / "inspect"
    result = snakemake(tmp_path / "work", "inspect",
                       config={"input_folder": output_dir, "inspect_folder": inspect_folder}, check=True)
    assert "3 saves (2 complete, 1 being written)" in result.stdout
    assert len(pd.read_csv(inspect_folder / "runs.csv")) == 3
    refused = snakemake(tmp_path / "work", "universal", config={"input_folder": output_dir})
    lines = (refused.stdout + refused.stderr).splitlines()
    errors = [line for line in lines if line.startswith("ucpflow error:")]
    assert refused.returncode != 0 and errors == [(
        f"ucpflow error: Config key `input_folder`: {output_dir} is the HF Trainer's output_dir, which holds many "
        f"saves; convert them with --config tags=all (or a list or glob of them), or set input_folder to one of its "
        f"checkpoint-N folders, such as {later}.")]
    assert not [line for line in lines if "Traceback" in line or "Exception" in line], lines
