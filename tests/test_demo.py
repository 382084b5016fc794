"""The demo builds a real DeepSpeed checkpoint by launching DeepSpeed on CPU (about 10-30 s)."""

import pytest
import torch

from ucpflow import dsconst
from ucpflow.demo.launch import build_checkpoint
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
