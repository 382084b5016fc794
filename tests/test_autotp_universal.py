"""DeepSpeed AutoTP x ZeRO checkpoints of tiny Hugging Face models, converted by ucpflow and by
ds_to_universal: identical; DeepSpeed resumes from both on another layout with equal losses.

AutoTP writes universal_checkpoint_info itself, with an affine map for every parameter. Each case
builds a tp 2 x dp 2 checkpoint on 4 CPU processes once per session (about 30 s).
"""

import re

import pytest
import torch
from conftest import convert, copy_tag, ds_to_universal
from universal_compare import compare_universal, resume_from_ours
from verify_run import verify_conversion

from ucpflow.demo.autotp.launch import resume_from_universal

CASES = {
    # separate q/k/v projections sharded by the Hugging Face tp_plan; ZeRO-1 files mp_rank_XX_*
    "llama_z1_bf16": dict(model="llama", tp=2, dp=2, zero_stage=1, dtype="bf16"),
    # fused [Q; K; V] of unequal sizes and [gate; up] as sub-parameters; ZeRO-3's (tp, dp) file grid
    "phi3_z3_fp32": dict(model="phi3", tp=2, dp=2, zero_stage=3, dtype="fp32"),
}

RESUME_LAYOUTS = {
    "llama_z1_bf16": dict(tp=1, dp=2, zero_stage=1),
    "phi3_z3_fp32": dict(tp=2, dp=1, zero_stage=3),
}


@pytest.fixture(scope="module")
def converted(autotp_checkpoint, tmp_path_factory):
    """converted(case) -> (ours, theirs): the case's checkpoint converted by ucpflow and by ds_to_universal, once."""
    conversions = {}

    def convert_both(case):
        if case not in conversions:
            tag = autotp_checkpoint(case, **CASES[case])
            root = tmp_path_factory.mktemp(f"autotp-{case}")
            source = copy_tag(tag, root / "checkpoint")
            ours = root / "ours" / f"{tag.name}_universal"
            convert(root / "run", source, ours)
            theirs = ds_to_universal(source, root / "theirs" / f"{tag.name}_universal")
            conversions[case] = (ours, theirs)
        return conversions[case]

    return convert_both


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_has_the_autotp_features_under_test(case, autotp_checkpoint):
    tag = autotp_checkpoint(case, **CASES[case])
    model_state = torch.load(sorted(tag.glob("*model_states.pt"))[0], weights_only=False)
    info = model_state["universal_checkpoint_info"]
    parameters = [name for shapes in model_state["param_shapes"] for name in shapes]
    optimizer_files = sorted(path.name for path in tag.glob("*optim_states.pt"))

    assert sorted(info["affine_map"]["params"]) == sorted(f"^{re.escape(name)}$" for name in parameters)
    assert r"^model\.layers\.0\.self_attn\.o_proj\.weight$" in info["parameter_with_row_parallelism_patterns"]
    # (dp, tp) ranks of the optimizer files: zero_pp_rank_{dp}_mp_rank_{tp}
    assert [name.partition("zero_pp_rank_")[2][:13] for name in optimizer_files] == [
        "0_mp_rank_00_", "0_mp_rank_01_", "1_mp_rank_00_", "1_mp_rank_01_"]
    if CASES[case]["model"] == "phi3":
        assert info["sub_param_shard_widths"][r"^model\.layers\.0\.self_attn\.qkv_proj\.weight$"] == [
            [32, 32], [16, 16], [16, 16]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_ds_to_universal(case, converted):
    ours, theirs = converted(case)
    assert compare_universal(ours, theirs, ours.parent / "latest_universal", theirs.parent / "latest_universal") == []


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_places_every_affine_piece(case, converted):
    ours, theirs = converted(case)
    [work] = (ours.parents[1] / "run" / "ucpflow-work").iterdir()
    for output in (ours, theirs):
        report, _, error = verify_conversion(work, output)
        assert error is None and {row["status"] for row in report} == {"ok"}, error

    # A row-parallel weight (an affine map of column blocks) with its tensor-parallel column halves exchanged.
    param = "model.layers.0.self_attn.o_proj.weight"
    path = theirs / "zero" / param / "fp32.pt"
    original = torch.load(path, weights_only=False)
    weight = original["param"]
    half = weight.shape[1] // 2
    torch.save({**original, "param": torch.cat([weight[:, half:], weight[:, :half]], dim=1)}, path)
    try:
        _, _, error = verify_conversion(work, theirs)
    finally:
        torch.save(original, path)
    assert error.startswith(f"Verification failed for {param} (fp32: mismatch);")


@pytest.mark.parametrize("case", sorted(RESUME_LAYOUTS))
def test_resume_on_other_layout(case, converted, tmp_path):
    ours, theirs = converted(case)
    model_options = {key: CASES[case][key] for key in ("model", "dtype")}
    resume_from_ours(ours, theirs, lambda root: resume_from_universal(
        root, losses_out=tmp_path / "ours.json", steps=2, **RESUME_LAYOUTS[case], **model_options))
