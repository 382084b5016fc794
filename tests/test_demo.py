"""The demo builds a real DeepSpeed checkpoint by launching DeepSpeed on CPU (about 10-30 s)."""

import os
import sys
import time

import pytest
import torch

from ucpflow import dsconst
from ucpflow.demo.launch import build_checkpoint
from ucpflow.demo.launcher import rank_environments, run_ranks
from ucpflow.errors import UcpflowError


@pytest.mark.deepspeed
def test_build_checkpoint_writes_deepspeed_bf16_zero_checkpoint(tmp_path):
    save_dir = tmp_path / "ckpt"
    tag_folder = build_checkpoint(save_dir, num_procs=2, zero_stage=1, dtype="bf16", layers=1, hidden=32, heads=2,
                                  vocab=50, seq_len=8, steps=1)

    assert tag_folder == save_dir / "global_step1"
    assert (save_dir / "latest").read_text().strip() == "global_step1"
    model_file = tag_folder / f"{dsconst.MODEL_FILE_PREFIX}00{dsconst.MODEL_FILE_SUFFIX}"
    optimizer_files = sorted(path.name for path in tag_folder.glob(f"*{dsconst.OPTIM_FILE_SUFFIX}"))
    assert optimizer_files == [
        f"{dsconst.BF16_ZERO_FILE_PREFIX}{rank}_{dsconst.MODEL_FILE_PREFIX}00{dsconst.OPTIM_FILE_SUFFIX}"
        for rank in range(2)
    ]
    model_state = torch.load(model_file, map_location="cpu", weights_only=False)
    assert model_state["dp_world_size"] == 2
    assert model_state["global_steps"] == 1
    assert model_state[dsconst.UNIVERSAL_CHECKPOINT_INFO] == {
        dsconst.UNIVERSAL_CHECKPOINT_VERSION_KEY: dsconst.UNIVERSAL_CHECKPOINT_VERSION_VALUE
    }
    assert model_state["module"]["wte.weight"].dtype == torch.bfloat16
    assert (save_dir.parent / "ckpt.log").is_file()


def test_build_checkpoint_rejects_an_unknown_option_before_launching(tmp_path):
    with pytest.raises(UcpflowError, match="zero_stag"):
        build_checkpoint(tmp_path / "ckpt", zero_stag=2)
    assert not (tmp_path / "ckpt.log").exists()


def test_a_failing_rank_ends_the_others_and_is_reported_with_its_error(tmp_path):
    """One rank raising ends the run at once (the others would wait on it forever), with its exception."""
    waits = [sys.executable, "-c", "import time; time.sleep(60)"]
    fails = [sys.executable, "-c", "raise ValueError('rank 1 has no data')"]
    started = time.monotonic()
    with pytest.raises(UcpflowError, match=r"(?s)exit code 1.*First error: ValueError: rank 1 has no data"):
        run_ranks([waits, fails], [dict(os.environ)] * 2, tmp_path / "ranks.log", timeout=60, what="testing")
    assert time.monotonic() - started < 30


def test_ranks_past_the_timeout_are_killed_and_reported(tmp_path):
    waits = [sys.executable, "-c", "import time; time.sleep(60)"]
    with pytest.raises(UcpflowError, match=r"timed out after 1 s while testing; see .*ranks.log"):
        run_ranks([waits, waits], [dict(os.environ)] * 2, tmp_path / "ranks.log", timeout=1, what="testing")


def test_each_rank_gets_the_environment_of_deepspeeds_launcher():
    environments = rank_environments(29500, 3)
    assert [env["RANK"] for env in environments] == ["0", "1", "2"]
    assert [env["LOCAL_RANK"] for env in environments] == ["0", "1", "2"]
    assert {(env["WORLD_SIZE"], env["LOCAL_SIZE"], env["MASTER_PORT"], env["CROSS_RANK"]) for env in environments} == {
        ("3", "3", "29500", "0")}
