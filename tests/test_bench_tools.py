"""The benchmark's measuring code (bench/): process-tree sampling, file counting, time breakdown, synthetic index."""

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from ucpflow.source.signature import derived_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import scale  # noqa: E402
from bench.footprint import Footprint, footprint, inodes  # noqa: E402
from bench.measure import ProcessSpan, Measurement, run_measured  # noqa: E402
from bench.profile import _union_length, job_rule, job_starts, logged_rule_times, profile_run  # noqa: E402
from bench.run import outside_output, parse_args  # noqa: E402

MIB = 2**20


def test_run_measured_sees_the_largest_process_and_the_whole_tree(tmp_path):
    child = "import time; block = bytearray(120 * 2**20); time.sleep(1.0)"
    parent = textwrap.dedent(f"""
        import subprocess, sys, time
        block = bytearray(40 * 2**20)
        subprocess.run([sys.executable, "-c", {child!r}])
    """)
    measured = run_measured([sys.executable, "-c", parent], log_path=tmp_path / "log")
    assert measured.returncode == 0
    assert measured.cpu_s > 0
    assert measured.peak_rss_process >= 120 * MIB
    assert measured.peak_rss_tree >= measured.peak_rss_process + 40 * MIB
    assert any(child in span.cmdline for span in measured.spans if span.pid != measured.root_pid)


def test_run_measured_reports_failure_and_kills_the_tree_on_timeout(tmp_path):
    assert run_measured([sys.executable, "-c", "raise SystemExit(3)"], log_path=tmp_path / "log").returncode == 3
    sleeper = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(60)'])"
    measured = run_measured([sys.executable, "-c", sleeper], log_path=tmp_path / "log", timeout=2)
    assert measured.returncode != 0
    assert len(measured.spans) == 2
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously
    while any(_alive(span.pid) for span in measured.spans) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(span.pid) for span in measured.spans)


def _alive(pid):
    """Running, not a zombie (this container's init may never reap an orphan)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_footprint_counts_files_bytes_and_bytes_not_shared_with_the_output(tmp_path):
    output = tmp_path / "out"
    (output / "zero" / "p").mkdir(parents=True)
    (output / "zero" / "p" / "fp32.pt").write_bytes(b"x" * 100)
    staging = output / "tmp" / "b0" / "p"
    staging.mkdir(parents=True)
    os.link(output / "zero" / "p" / "fp32.pt", staging / "fp32.pt")
    (staging / "scratch.bin").write_bytes(b"y" * 7)
    shared = inodes(output, skip="tmp")
    assert len(shared) == 1
    assert footprint(output / "tmp", shared) == Footprint(files=2, bytes=107, extra_bytes=7)
    assert footprint(tmp_path / "missing") == Footprint()


def test_outside_output_ignores_the_output_and_latest_universal(tmp_path):
    output = tmp_path / "universal" / "global_step1_universal"
    (output / "zero").mkdir(parents=True)
    (output / "zero" / "a.pt").write_bytes(b"1234")
    (tmp_path / "universal" / "latest_universal").write_text("global_step1_universal")
    (tmp_path / "work" / "index").mkdir(parents=True)
    (tmp_path / "work" / "index" / "layout.json").write_text("{}")
    assert outside_output(tmp_path, output) == Footprint(files=1, bytes=2, extra_bytes=0)


def _span(pid, ppid, cmdline, started, last_seen, cpu_s=0.0):
    return ProcessSpan(pid=pid, ppid=ppid, cmdline=cmdline, started=started, last_seen=last_seen, cpu_s=cpu_s)


def test_job_rule_recognises_the_script_jobs_of_snakemake_only():
    root = 10
    script = _span(11, root, ["python", "/run/.snakemake/scripts/tmpab_c12.merge.py"], 0, 1)
    grandchild = _span(12, 11, script.cmdline, 0, 1)
    other = _span(13, root, ["scontrol", "show", "config"], 0, 1)
    assert [job_rule(s, root) for s in (script, grandchild, other)] == ["merge", None, None]


def test_union_length_merges_overlapping_intervals():
    assert _union_length([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == pytest.approx(4.0)
    assert _union_length([]) == 0


def test_profile_run_combines_logs_metadata_and_sampled_processes(tmp_path):
    work, snakemake_folder = tmp_path / "work", tmp_path / ".snakemake"
    for relative, text in {
        "index.log": "indexed\nrule index done in 0.50 s\n",
        "merge/b0000.log": "rule merge done in 2.00 s\n",
        "merge/b0001.log": "rule merge done in 1.00 s\n",
        "publish/p1.log": "",
        "publish/p2.log": "",
        "publish/p3.log": "",
    }.items():
        (work / "logs" / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / "logs" / relative).write_text(text)
    (snakemake_folder / "metadata").mkdir(parents=True)
    epoch = 1000.0
    records = [
        ("index", 1, 1.0),
        ("index", 1, 1.0),
        ("merge", 2, 2.0),
        ("merge", 3, 2.1),
        ("publish", 4, 5.0),
        ("publish", 5, 5.2),
        ("publish", 6, 5.4),
    ]
    for number, (rule, job_hash, start) in enumerate(records):
        record = {"rule": rule, "job_hash": job_hash, "starttime": epoch + start}
        (snakemake_folder / "metadata" / f"record{number}").write_text(json.dumps(record))
    root = 7
    spans = [
        _span(root, 1, ["python", "-m", "snakemake"], 0.0, 8.0, cpu_s=4.0),
        _span(8, root, ["python", "/x/.snakemake/scripts/tmp1.index.py"], 1.0, 1.8),
        _span(9, root, ["python", "/x/.snakemake/scripts/tmp2.merge.py"], 2.0, 4.5, cpu_s=2.0),
        _span(10, root, ["python", "/x/.snakemake/scripts/tmp3.merge.py"], 2.1, 3.5, cpu_s=1.5),
    ]
    measured = Measurement(
        root_pid=root,
        epoch_started=epoch,
        returncode=0,
        wall=8.0,
        peak_rss_process=1,
        peak_rss_tree=1,
        samples=1,
        spans=spans,
    )
    assert logged_rule_times(work / "logs") == (
        {"index": [0.5], "merge": [2.0, 1.0]},
        {"index": 1, "merge": 2, "publish": 3},
    )
    assert job_starts(snakemake_folder, epoch)["index"] == [1.0]
    profile = profile_run(measured, work, snakemake_folder)
    assert list(profile["rules"]) == ["index", "merge", "publish"]
    assert profile["rules"]["merge"] == {
        "jobs": 2,
        "in_job_s": 3.0,
        "process_s": 3.9,
        "process_cpu_s": 3.5,
        "processes_sampled": 2,
        "first_start_s": 2.0,
        "last_start_s": 2.1,
        "last_end_s": 4.5,
    }
    assert profile["snakemake_cpu_s"] == 4.0
    assert profile["rules"]["publish"]["jobs"] == 3
    assert profile["rules"]["publish"]["in_job_s"] is None
    assert profile["rules"]["publish"]["processes_sampled"] == 0
    assert profile["rules"]["publish"]["last_start_s"] == pytest.approx(5.4)
    assert profile["startup_s"] == 1.0
    assert profile["no_job_running_s"] == pytest.approx(8.0 - 0.8 - 2.5)
    assert profile["after_last_job_s"] == pytest.approx(3.5)


def test_parse_args_adds_gpt355_only_on_request():
    assert parse_args([]).case_names == ["many", "gpt124"]
    assert parse_args(["--cases", "many", "--with-gpt355"]).case_names == ["many", "gpt355"]
    with pytest.raises(SystemExit):
        parse_args(["--cases", "gpt2"])


def test_bloom_stages_hold_every_layer_once():
    stages = scale.stage_parameters()
    assert len(stages) == scale.PP
    layers = {name.split(".")[0] for params in stages for name, _ in params if name[0].isdigit()}
    assert len(layers) == scale.LAYERS + 1  # the transformer layers and the final layernorm


def test_synthetic_bloom_index_has_the_tables_the_workflow_reads(tmp_path):
    folder, output, work, shape = scale.write_synthetic_index(tmp_path / "bloom")
    assert shape["rank_files"] == 384
    assert 800 <= shape["parameters"] <= 900
    assert len(list(folder.iterdir())) == 384 + 48
    assert all(path.stat().st_size == 0 for path in folder.iterdir())
    index = derived_folder(work) / "index"
    layout = json.loads((index / "layout.json").read_text())
    assert (layout["pp_degree"], layout["tp_degree"], layout["dp_degree"]) == (12, 4, 8)
    assert layout["output_folder"] == str(output)
    assert len(layout["copy_files"]) == 48
    params = pd.read_csv(index / "params.tsv", sep="\t", keep_default_na=False)
    assert set(layout["bucket_sources"]) == set(params["bucket"])
    assert all(name in layout["sources"] for names in layout["bucket_sources"].values() for name in names)
    assert set(params["merge"]) == {"column_parallel", "row_parallel", "replicated"}
    fragments = pd.read_csv(index / "fragments.tsv", sep="\t", keep_default_na=False)
    assert set(fragments["state"]) == {"fp32", "exp_avg", "exp_avg_sq", "step"}
    dense = fragments[fragments["param"] == "3.self_attention.dense.weight"]
    assert set(dense["shape"]) == {f"{scale.HIDDEN},{scale.HIDDEN // scale.TP}"}
    assert set(dense["tp"]) == set(range(scale.TP))
    assert (index / "universal_info.pkl").stat().st_size > 0


def test_job_counts_reads_snakemakes_job_stats_table():
    text = (
        "Building DAG\nJob stats:\njob       count\n------  -------\n"
        "merge         3\nall           1\ntotal         4\n\nReasons:\n"
    )
    assert scale.job_counts(text) == {"merge": 3, "all": 1, "total": 4}


def test_paired_wall_ratio_pairs_the_runs_of_each_round():
    from bench.report import paired_wall_ratio

    rows = pd.DataFrame(
        [
            {"case": "c", "tool": tool, "kind": kind, "repeat": repeat, "wall_s": wall}
            for tool, kind, repeat, wall in [
                ("ds_to_universal", "footprint", 0, 1.0),
                ("ucpflow", "footprint", 0, 100.0),
                ("ds_to_universal", "timed", 0, 10.0),
                ("ucpflow", "timed", 0, 5.0),
                ("ds_to_universal", "timed", 1, 40.0),
                ("ucpflow", "timed", 1, 30.0),
                ("ds_to_universal", "timed", 2, 20.0),
                ("ucpflow", "timed", 2, 4.0),
            ]
        ]
    )
    assert paired_wall_ratio(rows, "c") == pytest.approx(0.5)
    assert paired_wall_ratio(rows[rows["tool"] == "ucpflow"], "c") is None


def test_workflow_snapshot_and_fingerprint_cover_the_workflow_files_only(tmp_path):
    from bench.workflow import snapshot_workflow, workflow_fingerprint

    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "merge.smk").write_text("rule merge:\n")
    (tmp_path / "Snakefile").write_text("include: 'rules/merge.smk'\n")
    before = workflow_fingerprint(tmp_path)
    (tmp_path / "notes.txt").write_text("not part of the workflow")
    assert workflow_fingerprint(tmp_path) == before
    (tmp_path / "rules" / "__pycache__").mkdir()
    (tmp_path / "rules" / "__pycache__" / "x.pyc").write_bytes(b"compiled")
    snakefile = snapshot_workflow(tmp_path, tmp_path / "copy")
    assert snakefile.read_text() == "include: 'rules/merge.smk'\n"
    assert sorted(p.name for p in (tmp_path / "copy").rglob("*")) == ["Snakefile", "merge.smk", "rules"]
    assert workflow_fingerprint(tmp_path / "copy") == before
    (tmp_path / "rules" / "merge.smk").write_text("rule merge:\n    threads: 2\n")
    assert workflow_fingerprint(tmp_path) != before


def test_intermediate_files_table_counts_only_the_files_that_carry_data():
    from types import SimpleNamespace

    from bench.report import intermediate_files_table

    bench = SimpleNamespace(
        case=SimpleNamespace(name="c"),
        rank_files=2,
        footprints={
            "ds_to_universal": {"tmp/ inside the output": Footprint(files=600)},
            "ucpflow": {
                "tmp/ inside the output": Footprint(files=580),
                "work folder: extract/": Footprint(files=3),
                "work folder: index/": Footprint(files=4),
                "work folder: logs/": Footprint(files=9),
                ".snakemake/ (Snakemake's records)": Footprint(files=600),
            },
        },
    )
    rows = [line for line in intermediate_files_table([bench]) if line.startswith("| c ")]
    assert rows == ["| c | 300.000 | 3.500 | 4 | met |"]


def test_floor_runs_the_generated_workflow_with_n_and_one_parameter_jobs(tmp_path):
    from bench import floor

    floor.main(["--parameters", "3", "--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "floor.json").read_text())
    assert result["parameters"] == 3
    assert {count: len(walls) for count, walls in result["walls"].items()} == {"3": 1, "1": 1}
    assert result["wall_s_median"] > 0 and isinstance(result["ms_per_parameter_job"], float)
    assert (tmp_path / "floor-3-0.log").is_file() and (tmp_path / "floor-1-0.log").is_file()


def test_runs_bench_copies_a_save_into_a_run_of_aged_saves(tmp_path):
    from bench.runs import LONG_AGO, make_run

    tag = tmp_path / "global_step4"
    tag.mkdir()
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    run = tmp_path / "run"
    make_run(tag, run, 3)
    assert sorted(path.name for path in run.iterdir()) == ["global_step1", "global_step2", "global_step3", "latest"]
    assert (run / "latest").read_text() == "global_step3"
    assert {path.stat().st_mtime for path in run.rglob("*")} == {LONG_AGO}


def test_hf_bench_compares_the_exports_tensor_by_tensor(tmp_path):
    import torch
    from safetensors.torch import save_file

    from bench.hf import outputs_equal

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    weight = torch.arange(6.0).reshape(2, 3)
    save_file({"embed.weight": weight}, ours / "model.safetensors")
    save_file({"embed.weight": weight.clone()}, theirs / "model.safetensors")
    assert outputs_equal(ours, theirs) == []
    save_file({"embed.weight": weight + 1}, theirs / "model.safetensors")
    assert outputs_equal(ours, theirs) == ["embed.weight"]
    (theirs / "model.safetensors").unlink()
    torch.save({"embed.weight": weight, "lm_head.weight": weight}, theirs / "pytorch_model.bin")
    assert outputs_equal(ours, theirs) == []  # a tied lm_head.weight is stored once by ucpflow


def test_scaling_floor_reads_the_input_and_writes_the_output_bytes_once(tmp_path):
    from bench.scaling import file_names, floor_seconds

    tag = tmp_path / "tag"
    tag.mkdir()
    (tag / "a.pt").write_bytes(b"x" * 1000)
    seconds = floor_seconds(tag, 3 * 2**20, tmp_path)
    assert seconds > 0 and not (tmp_path / "floor.bin").exists()
    assert file_names(tmp_path) == ["tag/a.pt"]
