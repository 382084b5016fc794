"""DeepSpeed resumes from ucpflow's universal output on another data-parallel degree, exactly as from its own."""

import pytest
from conftest import convert, copy_tag, ds_to_universal

from ucpflow.demo.launch import resume_from_universal

RESUMES = {
    # saved on 2 processes with ZeRO-1 bf16, resumed on 3
    "z1_bf16_dp2": (dict(num_procs=2, zero_stage=1, dtype="bf16"), 3),
    # saved on 3 processes with odd sizes (padded partitions), resumed on 2
    "z1_bf16_dp3_odd": (dict(num_procs=3, zero_stage=1, dtype="bf16", hidden=63, heads=3, vocab=499), 2),
}


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_on_other_dp_degree_matches_deepspeed(case, deepspeed_checkpoint, tmp_path):
    spec, resume_procs = RESUMES[case]
    tag = deepspeed_checkpoint(case, **spec)
    source = copy_tag(tag, tmp_path / "checkpoint")
    convert(tmp_path / "run", source, tmp_path / "ours" / f"{tag.name}_universal")
    ds_to_universal(source, tmp_path / "theirs" / f"{tag.name}_universal")
    options = {k: v for k, v in spec.items() if k != "num_procs"}
    losses_ours = resume_from_universal(tmp_path / "ours", num_procs=resume_procs, losses_out=tmp_path / "ours.json", steps=2, **options)
    losses_theirs = resume_from_universal(
        tmp_path / "theirs", num_procs=resume_procs, losses_out=tmp_path / "theirs.json", steps=2, **options
    )
    assert len(losses_ours) == 2
    assert losses_ours == losses_theirs
