"""Incremental reruns after a complete conversion: a deleted parameter folder reruns only its bucket's
merge; a changed rank file reruns only its extraction and the merges whose buckets read it.

The rank files here are 14 MB, above Snakemake's 1 MB checksum limit, so a new mtime alone marks a
rank file as changed (smaller files are compared by checksum and would need a changed content)."""

import os
import shutil

import pandas as pd
import pytest
from conftest import copy_tag
from many_parameters import MERGE_MIN_JOBS, many_parameters  # noqa: F401  (pytest fixture)
from universal_compare import compare_universal
from workflow_runs import jobs_run, run_workflow, workflow_command


class CompleteConversion:
    def __init__(self, root, tag):
        self.source = copy_tag(tag, root / "checkpoint")
        self.output = root / "out" / f"{tag.name}_universal"
        self.latest = self.output.parent / "latest_universal"
        self.work = root / "work"
        self.root = root
        config = {"input_folder": self.source, "output_folder": self.output, "work_folder": self.work,
                  "merge_min_jobs": MERGE_MIN_JOBS}
        self.command = workflow_command(root / "run", config)
        returncode, output = run_workflow(self.command, root / "first.log")
        assert returncode == 0, output[-3000:]
        params = pd.read_csv(self.work / "index" / "params.tsv", sep="\t", keep_default_na=False)
        self.bucket_of = dict(zip(params["param"], params["bucket"]))
        self.layout = pd.read_json(self.work / "index" / "layout.json", typ="series")

    def parameters_of(self, buckets):
        return [param for param, bucket in self.bucket_of.items() if bucket in buckets]

    def rerun(self, name):
        returncode, output = run_workflow(self.command, self.root / f"{name}.log")
        assert returncode == 0, output[-3000:]
        return jobs_run(output)

    def matches(self, theirs):
        return compare_universal(self.output, theirs, self.latest, theirs.parent / "latest_universal") == []


def test_deleted_parameter_folder_reruns_only_its_bucket(many_parameters, tmp_path):
    tag, theirs = many_parameters
    conversion = CompleteConversion(tmp_path, tag)
    param = "blocks.20.mlp.fc.weight"
    bucket = conversion.bucket_of[param]
    shutil.rmtree(conversion.output / "zero" / param)

    jobs = conversion.rerun("after-delete")

    print(f"\ndeleted {param} ({bucket}): rerun did {dict(jobs)}")
    assert jobs == {"merge": 1, "publish": len(conversion.parameters_of({bucket})), "finalize": 1}
    assert conversion.matches(theirs)


def test_deleted_report_table_and_parameter_folder_are_both_rewritten(many_parameters, tmp_path):
    tag, theirs = many_parameters
    conversion = CompleteConversion(tmp_path, tag)
    param = "blocks.3.attn.qkv.bias"
    bucket = conversion.bucket_of[param]
    (conversion.work / "report" / "files.md").unlink()
    shutil.rmtree(conversion.output / "zero" / param)

    jobs = conversion.rerun("after-delete-report")

    assert jobs == {
        "report_tables": 1,
        "merge": 1,
        "publish": len(conversion.parameters_of({bucket})),
        "finalize": 1,
    }
    assert (conversion.work / "report" / "files.md").is_file()
    assert conversion.matches(theirs)


@pytest.mark.parametrize("rank", [0, 1])
def test_changed_rank_file_reruns_its_extraction_and_the_merges_reading_it(rank, many_parameters, tmp_path):
    tag, theirs = many_parameters
    conversion = CompleteConversion(tmp_path, tag)
    rank_file = conversion.source / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    assert rank_file.stat().st_size > 2**20, "a file this small is compared by checksum, not mtime"
    name = rank_file.name[: -len(".pt")]
    readers = {bucket for bucket, sources in conversion.layout["bucket_sources"].items() if name in sources}
    assert 0 < len(readers) < len(conversion.layout["bucket_sources"])
    os.utime(rank_file)

    jobs = conversion.rerun("after-touch")

    print(f"\nchanged {rank_file.name}: {len(readers)} of {len(conversion.layout['bucket_sources'])} "
          f"buckets read it; rerun did {dict(jobs)}")
    expected = {"extract": 1, "merge": len(readers), "publish": len(conversion.parameters_of(readers)), "finalize": 1}
    if conversion.layout["optimizer_state_source"] == str(rank_file):
        expected["optimizer_state"] = 1
    assert jobs == expected
    assert conversion.matches(theirs)
