"""A checkpoint with many small parameters (48 layers of width 64: 581 parameter folders, rank files of
14 MB), so that the phases of a conversion last long enough to interrupt, and several merge jobs read
different rank files. Its rank files exceed Snakemake's 1 MB checksum limit, so a new mtime alone marks
them changed."""

import pytest
from conftest import ds_to_universal

NAME = "z1_bf16_dp2_l48"
SPEC = dict(num_procs=2, zero_stage=1, dtype="bf16", layers=48, hidden=64)
# Six merge jobs: rank 0 is read by four of them, rank 1 by three.
MERGE_MIN_JOBS = 6


@pytest.fixture(scope="session")
def many_parameters(deepspeed_checkpoint, tmp_path_factory):
    """(tag folder, ds_to_universal's conversion of it)."""
    tag = deepspeed_checkpoint(NAME, **SPEC)
    theirs = ds_to_universal(tag, tmp_path_factory.mktemp("many-parameters") / "theirs" / f"{tag.name}_universal")
    return tag, theirs
