"""A merge job that fails half-way (a tensor-parallel replicated parameter whose ranks differ) leaves
nothing of its bucket that could pass for finished output, and no latest_universal."""

import csv

from conftest import copy_tag, snakemake
from test_megatron_universal import change_fragment
from workflow_runs import unfinished_entries
from ucpflow.source.signature import derived_folder

PARAM = "2.input_layernorm.weight"


def test_failing_merge_leaves_no_output_of_its_bucket(megatron_checkpoint, tmp_path):
    source = copy_tag(megatron_checkpoint("t2p1d2", tp=2, pp=1, dp=2), tmp_path / "checkpoint")
    assert any([change_fragment(path, PARAM) for path in sorted(source.glob("*_mp_rank_01_optim_states.pt"))])
    output, work = tmp_path / "out" / "u", tmp_path / "work"
    # Several buckets, so that the failing one is not the whole conversion.
    config = {"input_folder": source, "output_folder": output, "work_folder": work, "merge_min_jobs": 4}

    result = snakemake(tmp_path / "run", config=config)

    assert result.returncode != 0
    assert f"Parameter {PARAM} is declared tensor-parallel replicated" in result.stderr
    assert "Trying to restart job" in result.stderr, "the merge job is retried once (config `retries`)"
    with open(derived_folder(work) / "index" / "params.tsv", newline="") as handle:
        params = list(csv.DictReader(handle, delimiter="\t"))
    bucket = next(row["bucket"] for row in params if row["param"] == PARAM)
    assert len({row["bucket"] for row in params}) == 4
    staging = output / "tmp"
    assert list(staging.glob(f".{bucket}.*")) == [] and not (staging / bucket).exists()
    in_bucket = [row["param"] for row in params if row["bucket"] == bucket]
    assert [param for param in in_bucket if (output / "zero" / param).exists()] == []
    assert unfinished_entries(tmp_path / "out") == []
    assert not (output.parent / "latest_universal").exists()
