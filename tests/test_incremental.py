"""Incremental reruns after a complete conversion: a deleted parameter folder reruns its bucket's merge
and the publishes of that bucket; a changed rank file (a new signature of the input) indexes the input again and
converts all of it, since every table was derived from the old files."""

import os
import shutil

import pandas as pd
from conftest import copy_tag
from many_parameters import MERGE_MIN_JOBS, many_parameters  # noqa: F401  (pytest fixture)
from universal_compare import compare_universal
from workflow_runs import jobs_run, run_workflow, workflow_command
from ucpflow.source.signature import derived_folder


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
        params = pd.read_csv(derived_folder(self.work) / "index" / "params.tsv", sep="\t", keep_default_na=False)
        self.bucket_of = dict(zip(params["param"], params["bucket"]))
        self.layout = pd.read_json(derived_folder(self.work) / "index" / "layout.json", typ="series")

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
    # finalize checks the folder again, then latest_universal is written again, last.
    assert jobs == {"merge": 1, "publish": len(conversion.parameters_of({bucket})), "finalize": 1,
                    "latest_universal": 1}
    assert conversion.matches(theirs)


def test_deleted_report_table_and_parameter_folder_are_both_rewritten(many_parameters, tmp_path):
    tag, theirs = many_parameters
    conversion = CompleteConversion(tmp_path, tag)
    param = "blocks.3.attn.qkv.bias"
    bucket = conversion.bucket_of[param]
    (derived_folder(conversion.work) / "report" / "files.md").unlink()
    shutil.rmtree(conversion.output / "zero" / param)

    jobs = conversion.rerun("after-delete-report")

    assert jobs == {
        "report_tables": 1,
        "merge": 1,
        "publish": len(conversion.parameters_of({bucket})),
        "finalize": 1,
        "latest_universal": 1,
    }
    assert (derived_folder(conversion.work) / "report" / "files.md").is_file()
    assert conversion.matches(theirs)


def test_changed_rank_file_indexes_and_converts_the_input_again(many_parameters, tmp_path):
    tag, theirs = many_parameters
    conversion = CompleteConversion(tmp_path, tag)
    old_derived = derived_folder(conversion.work)
    rank_file = conversion.source / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    os.utime(rank_file)

    jobs = conversion.rerun("after-touch")

    print(f"\nchanged {rank_file.name}: rerun did {dict(jobs)}")
    buckets = len(conversion.layout["bucket_sources"])
    assert jobs["index"] == 1 and jobs["extract"] == len(conversion.layout["sources"])
    assert jobs["merge"] == buckets and jobs["publish"] == len(conversion.bucket_of) and jobs["finalize"] == 1
    assert derived_folder(conversion.work) != old_derived and not old_derived.exists()
    assert conversion.matches(theirs)
