"""DeepSpeed resumes from ucpflow's universal output on another data-parallel degree, exactly as from its own.

The z1_bf16_dp2 case resumes from both outputs and compares the losses; the others check that the outputs are
identical (which makes the second resume the same computation) and resume from ucpflow's."""

import pytest
from conftest import convert, copy_tag, ds_to_universal
from universal_compare import resume_from_ours

from ucpflow.demo.launch import resume_from_universal

RESUMES = {
    # saved on 2 processes with ZeRO-1 bf16, resumed on 3
    "z1_bf16_dp2": (dict(num_procs=2, zero_stage=1, dtype="bf16"), 3),
    # saved on 3 processes with odd sizes (padded partitions), resumed on 2
    "z1_bf16_dp3_odd": (dict(num_procs=3, zero_stage=1, dtype="bf16", hidden=63, heads=3, vocab=499), 2),
}
BOTH_SIDES = "z1_bf16_dp2"


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_on_other_dp_degree_matches_deepspeed(case, deepspeed_checkpoint, tmp_path):
    spec, resume_procs = RESUMES[case]
    tag = deepspeed_checkpoint(case, **spec)
    source = copy_tag(tag, tmp_path / "checkpoint")
    ours = tmp_path / "ours" / f"{tag.name}_universal"
    convert(tmp_path / "run", source, ours)
    theirs = ds_to_universal(source, tmp_path / "theirs" / f"{tag.name}_universal")
    options = {k: v for k, v in spec.items() if k != "num_procs"}

    def resume(root, side="ours"):
        return resume_from_universal(root, num_procs=resume_procs, losses_out=tmp_path / f"{side}.json", steps=2, **options)

    losses_ours = resume_from_ours(ours, theirs, resume)
    if case == BOTH_SIDES:
        assert losses_ours == resume(theirs.parent, "theirs")
