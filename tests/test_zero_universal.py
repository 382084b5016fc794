"""ZeRO-1/2/3 checkpoints written by DeepSpeed, converted by ucpflow and by ds_to_universal: identical output."""

import pytest
from conftest import convert, copy_tag, ds_to_universal
from universal_compare import compare_universal

CASES = {
    "z1_bf16_dp2": dict(num_procs=2, zero_stage=1, dtype="bf16"),
    "z2_fp32_dp2": dict(num_procs=2, zero_stage=2, dtype="fp32"),
    "z3_bf16_dp2": dict(num_procs=2, zero_stage=3, dtype="bf16"),
    "z1_bf16_dp3_odd": dict(num_procs=3, zero_stage=1, dtype="bf16", hidden=63, heads=3, vocab=499),
    "z3_fp32_dp3_odd": dict(num_procs=3, zero_stage=3, dtype="fp32", hidden=63, heads=3, vocab=499),
    "z2_bf16_frozen": dict(num_procs=2, zero_stage=2, dtype="bf16", freeze=["wpe.weight"]),
}


def converted_pair(tmp_path, tag, **config):
    source = copy_tag(tag, tmp_path / "checkpoint")
    ours = tmp_path / "ours" / f"{tag.name}_universal"
    convert(tmp_path / "run", source, ours, **config)
    flags = ["--inject_missing_state"] if config.get("inject_missing_state") else []
    theirs = ds_to_universal(source, tmp_path / "theirs" / f"{tag.name}_universal", *flags)
    return ours, theirs


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_ds_to_universal(case, deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint(case, **CASES[case])
    ours, theirs = converted_pair(tmp_path, tag)
    assert compare_universal(ours, theirs, ours.parent / "latest_universal", theirs.parent / "latest_universal") == []
    assert (ours.parent / "latest_universal").read_text() == ours.name


def test_frozen_parameter_comes_from_model_weights(deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint("z2_bf16_frozen", **CASES["z2_bf16_frozen"])
    ours, _ = converted_pair(tmp_path, tag)
    frozen = sorted(p.name for p in (ours / "zero" / "wpe.weight").iterdir())
    assert frozen == ["fp32.pt"]


def test_checkpoint_without_universal_info_with_inject(deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint("z1_fp32_no_info", num_procs=2, zero_stage=1, dtype="fp32", universal_info=False)
    ours, theirs = converted_pair(tmp_path, tag, inject_missing_state="true")
    assert compare_universal(ours, theirs) == []


def test_parent_folder_with_latest_resolves_the_tag(deepspeed_checkpoint, tmp_path):
    tag = deepspeed_checkpoint("z1_bf16_dp2", **CASES["z1_bf16_dp2"])
    source = copy_tag(tag, tmp_path / "checkpoint")
    ours = tmp_path / "ours" / "universal"
    convert(tmp_path / "run", source.parent, ours)
    theirs = ds_to_universal(source, tmp_path / "theirs" / "universal")
    assert compare_universal(ours, theirs) == []
