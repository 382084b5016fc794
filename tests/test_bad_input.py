"""Bad input fails early with one sentence naming the file or key, and leaves nothing that looks complete."""

from pathlib import Path

import pytest
from conftest import copy_tag, snakemake

DEMO = dict(num_procs=2, zero_stage=1, dtype="bf16")
RANK1 = "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"


def fails(workdir, input_folder, output_folder, **config):
    result = snakemake(workdir, config={"input_folder": input_folder, "output_folder": output_folder, **config})
    assert result.returncode != 0, result.stdout[-2000:]
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("ucpflow error:")]
    assert errors, result.stderr[-3000:]
    return errors[0]


def assert_nothing_complete(output_folder):
    output_folder = Path(output_folder)
    assert not (output_folder.parent / "latest_universal").exists()
    assert not list(output_folder.glob("zero/*/fp32.pt"))
    assert not list(output_folder.glob("*_model_states.pt"))


@pytest.fixture
def checkpoint(deepspeed_checkpoint, tmp_path):
    return copy_tag(deepspeed_checkpoint("z1_bf16_dp2", **DEMO), tmp_path / "checkpoint")


def test_missing_input_folder(tmp_path):
    message = fails(tmp_path / "run", tmp_path / "nowhere", tmp_path / "out" / "u")
    assert "input_folder" in message and "nowhere" in message and "does not exist" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_folder_without_optimizer_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a checkpoint")
    message = fails(tmp_path / "run", tmp_path / "empty", tmp_path / "out" / "u")
    assert "empty" in message and "optimizer files" in message


def test_missing_rank_file(checkpoint, tmp_path):
    (checkpoint / RANK1).unlink()
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u")
    assert RANK1 in message and "missing" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_truncated_rank_file(checkpoint, tmp_path):
    path = checkpoint / RANK1
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u")
    assert RANK1 in message and "truncated" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_non_torch_rank_file(checkpoint, tmp_path):
    (checkpoint / RANK1).write_text("this is not a torch file\n" * 100)
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u")
    assert RANK1 in message and "not" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_files_from_two_tags_mixed(checkpoint, deepspeed_checkpoint, tmp_path):
    earlier = deepspeed_checkpoint("z1_bf16_dp2_step2", steps=2, **DEMO)
    (checkpoint / RANK1).write_bytes((earlier / RANK1).read_bytes())
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u")
    assert RANK1 in message and "different checkpoints" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_missing_universal_checkpoint_info(deepspeed_checkpoint, tmp_path):
    tag = copy_tag(deepspeed_checkpoint("z1_fp32_no_info", num_procs=2, zero_stage=1, dtype="fp32", universal_info=False),
                   tmp_path / "checkpoint")
    message = fails(tmp_path / "run", tag, tmp_path / "out" / "u")
    assert "universal_checkpoint_info" in message and "inject_missing_state" in message
    assert_nothing_complete(tmp_path / "out" / "u")


def test_output_folder_holding_something_else(checkpoint, tmp_path):
    output = tmp_path / "out" / "u"
    output.mkdir(parents=True)
    (output / "precious.txt").write_text("keep me")
    message = fails(tmp_path / "run", checkpoint, output)
    assert "precious.txt" in message and str(output) in message
    assert (output / "precious.txt").read_text() == "keep me"
    assert_nothing_complete(output)


def test_bad_config_value_names_the_key(checkpoint, tmp_path):
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u", merge_min_jobs=0)
    assert "merge_min_jobs" in message


def test_unknown_config_key_is_refused(checkpoint, tmp_path):
    message = fails(tmp_path / "run", checkpoint, tmp_path / "out" / "u", merge_jobs=3)
    assert "merge_jobs" in message
