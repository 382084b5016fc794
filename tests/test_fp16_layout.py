"""fp16 checkpoints (CPU DeepSpeed refuses to train fp16): a trained fp32 checkpoint rewritten into the
fp16 layout — fp16_zero_pp_rank_* optimizer files, fp16 model weights, a dynamic loss scaler — converts
exactly as ds_to_universal converts it."""

import numpy as np
from conftest import convert, copy_tag, ds_to_universal
from universal_compare import compare_universal

from ucpflow import dsconst as C
from ucpflow import ptfile

LOSS_SCALER = ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler")


def to_fp16_weights(module):
    for name, tensor in module.items():
        module[name] = ptfile.ArrayTensor(tensor.read_array().astype(np.float16), "float16")


def rewrite_as_fp16(tag):
    for path in tag.glob(f"{C.MODEL_FILE_PREFIX}*{C.MODEL_FILE_SUFFIX}"):
        state = ptfile.load(path)
        to_fp16_weights(state["module"])
        ptfile.save(state, path)
    for path in sorted(tag.glob(f"{C.ZERO_FILE_PREFIX}*{C.OPTIM_FILE_SUFFIX}")):
        state = ptfile.load(path)
        optim = state[C.OPTIMIZER_STATE_DICT]
        optim[C.LOSS_SCALER] = ptfile.opaque_instance(*LOSS_SCALER, {
            "cur_scale": 1024.0, "dynamic": True, "cur_iter": 4, "last_overflow_iter": -1, "scale_factor": 2.0,
            "scale_window": 1000, "min_scale": 1, "delayed_shift": 1, "cur_hysteresis": 1,
            "consecutive_hysteresis": False, "raise_error_at_min_scale": True, "dtype": ptfile.DType("float16"),
        })
        optim["dynamic_loss_scale"] = True
        ptfile.save(state, path.with_name("fp16_" + path.name))
        path.unlink()


def test_fp16_layout_matches_ds_to_universal(deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint("z2_fp32_frozen", num_procs=2, zero_stage=2, dtype="fp32", freeze=["wpe.weight"])
    source = copy_tag(tag, tmp_path / "checkpoint")
    rewrite_as_fp16(source)
    assert sorted(p.name for p in source.glob("*optim_states.pt"))[0].startswith(C.FP16_ZERO_FILE_PREFIX)
    ours = tmp_path / "ours" / "universal"
    convert(tmp_path / "run", source, ours)
    theirs = ds_to_universal(source, tmp_path / "theirs" / "universal")
    assert compare_universal(ours, theirs) == []
