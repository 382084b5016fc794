"""What a new user meets in the first hour (issue 21): folders inside the input refused, input folder and
config-key typos answered with the fix, the output placed beside the input's tag folder, the targets listed
with descriptions and `snakemake help` — each failure one sentence on a short console, no traceback."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from snakemake.utils import validate

from ucpflow.config import Settings, refuse_folders_inside_input
from ucpflow.errors import UcpflowError

SCHEMA = REPO / "schemas" / "config.schema.yaml"
RANK0 = "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
# What Snakemake itself prints when a run fails inside it; none of it may reach a user's console.
SNAKEMAKE_NOISE = ("Traceback", "RuleException", "CalledProcessError", "WorkflowError", "Exception in", "Error in rule")


def console(workdir, *args, config=None):
    """Run the workflow as a user does (the default profile's quiet settings) and return (rc, console lines)."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "1", *args]
    if config:
        command += ["--config", *(f"{key}={value}" for key, value in config.items())]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def failure_sentence(workdir, *args, config=None, max_lines=3):
    """The one `ucpflow error:` line of a failing run, after checking the console holds nothing else of note."""
    returncode, lines = console(workdir, *args, config=config)
    assert returncode != 0, lines
    errors = [line for line in lines if line.startswith("ucpflow error:")]
    assert len(errors) == 1, lines
    assert not [line for line in lines if any(noise in line for noise in SNAKEMAKE_NOISE)], lines
    assert len(lines) <= max_lines, lines
    return errors[0]


def fake_tag(folder):
    """A folder the input check takes for a tag folder (one optimizer file; its contents are never read here)."""
    folder.mkdir(parents=True)
    (folder / RANK0).write_bytes(b"")
    return folder


def settings(**config):
    validate(config, schema=str(SCHEMA), set_default=True)
    return Settings.from_config(config)


@pytest.mark.parametrize("key", ["output_folder", "work_folder", "hf_folder", "megatron_folder", "inspect_folder"])
def test_a_folder_inside_the_input_is_refused_naming_both(key, tmp_path):
    tag = fake_tag(tmp_path / "run" / "global_step4")
    (tag.parent / "latest").write_text(tag.name)
    inside = tag / "written"
    with pytest.raises(UcpflowError) as refusal:
        settings(**{"input_folder": str(tag.parent), "output_folder": str(tmp_path / "u"), key: str(inside)})
    message = str(refusal.value)
    assert f"`{key}`" in message and str(inside) in message and f"tag folder {tag}" in message
    assert message.count(". ") == 0 and message.endswith(".")


def test_the_tag_folder_itself_and_any_further_key_are_refused(tmp_path):
    tag = fake_tag(tmp_path / "global_step4")
    with pytest.raises(UcpflowError, match="`reshard_folder`"):
        refuse_folders_inside_input(str(tag), [("output_folder", str(tmp_path / "u")), ("reshard_folder", str(tag))])
    refuse_folders_inside_input(str(tag), [("reshard_folder", str(tmp_path / "global_step4_resharded"))])


def test_an_output_inside_the_tag_folder_fails_on_the_console_before_anything_is_written(tmp_path):
    tag = fake_tag(tmp_path / "run" / "global_step4")
    message = failure_sentence(tmp_path / "work", config={"input_folder": tag, "output_folder": tag / "universal"})
    assert str(tag / "universal") in message and str(tag) in message and f"{tag}_universal" in message
    assert sorted(path.name for path in tag.iterdir()) == [RANK0]
    assert not (tmp_path / "run" / "latest_universal").exists() and not (tmp_path / "work" / "ucpflow-work").exists()


def test_a_parent_without_latest_names_its_tag_folders_and_the_input_to_use(tmp_path):
    for step in (2, 10):
        fake_tag(tmp_path / "run" / f"global_step{step}")
    message = failure_sentence(tmp_path / "work", config={"input_folder": tmp_path / "run"})
    assert "global_step2, global_step10" in message
    assert f"input_folder={tmp_path / 'run' / 'global_step10'}" in message


@pytest.mark.parametrize("typo, suggestion", [("merge_min_job", "merge_min_jobs"), ("outptu_folder", "output_folder"),
                                              ("demo.stepz", "demo.steps")])
def test_a_config_key_typo_suggests_the_nearest_key(typo, suggestion, tmp_path):
    tag = fake_tag(tmp_path / "global_step4")
    key, _, inner = typo.partition(".")
    value = f"{{{inner}: 3}}" if inner else 3
    message = failure_sentence(tmp_path / "work", config={"input_folder": tag, key: value})
    assert f"`{typo}`" in message and f"did you mean `{suggestion}`?" in message


def test_without_output_folder_the_output_goes_beside_the_tag_folder(tmp_path):
    tag = fake_tag(tmp_path / "run" / "global_step7")
    (tmp_path / "run" / "latest").write_text("global_step7")
    for input_folder in (tag, tag.parent):
        chosen = settings(input_folder=str(input_folder))
        assert chosen.output_folder == f"{tag}_universal"
        assert chosen.latest_universal == str(tmp_path / "run" / "latest_universal")
        assert not chosen.builds_demo
    assert settings(input_folder=str(tag), output_folder=str(tmp_path / "u")).output_folder == str(tmp_path / "u")


def test_the_demo_paths_are_used_only_for_the_demo():
    shipped = yaml.safe_load((REPO / "config.yaml").read_text())
    demo = settings(**shipped)
    assert demo.builds_demo and demo.input_folder == "demo/checkpoint"
    assert demo.output_folder == os.path.join("demo", "checkpoint", "global_step4_universal")
    assert settings(input_folder="demo/checkpoint", demo={"steps": 2}).output_folder.endswith("global_step2_universal")


USER_TARGETS = ("universal", "inspect", "verify", "hf", "megatron", "help")


def test_every_config_key_has_a_description_and_help_prints_them_with_their_defaults(tmp_path):
    from ucpflow.helptext import config_keys

    keys = config_keys(yaml.safe_load(SCHEMA.read_text()))
    assert {"input_folder", "output_folder", "demo.steps", "hf_folder"} <= {key for key, _, _ in keys}
    assert all(meaning for _, _, meaning in keys), [key for key, _, meaning in keys if not meaning]
    returncode, lines = console(tmp_path / "work", "help")
    assert returncode == 0, lines
    text = "\n".join(lines)
    for name in USER_TARGETS:
        assert [line for line in lines if line.startswith(f"  {name} ") and len(line.split()) > 3], (name, text)
    for key, default, meaning in keys:
        assert f"  {key} (default: {default})" in text
        assert " ".join(meaning.split()[:4]) in " ".join(text.split())
    assert not [line for line in lines if any(noise in line for noise in SNAKEMAKE_NOISE)]


def test_the_targets_are_listed_with_one_line_descriptions_and_universal_converts(tmp_path):
    returncode, lines = console(tmp_path / "work", "--list-target-rules")
    assert returncode == 0, lines
    for name in (*USER_TARGETS, "all"):
        described = [line for line in lines if line.startswith(f"{name} (Target") and line.endswith(")")]
        assert described, (name, lines)
    tag = fake_tag(tmp_path / "run" / "global_step4")
    for target in ("universal", "all"):
        returncode, lines = console(tmp_path / "work", "-n", target, config={"input_folder": tag})
        assert returncode == 0 and any("index" in line for line in lines), lines


def test_a_failing_job_prints_its_sentence_and_where_the_logs_are_and_nothing_of_snakemakes_report(tmp_path):
    tag = fake_tag(tmp_path / "global_step4")  # its optimizer file is empty: the index job fails on it
    returncode, lines = console(tmp_path / "work", config={"input_folder": tag})
    assert returncode != 0
    errors = [line for line in lines if line.startswith("ucpflow error:")]
    assert len(errors) == 1 and RANK0 in errors[0] and "not a PyTorch checkpoint" in errors[0], lines
    assert lines[-1].startswith("ucpflow: the run stopped; every job's log is in ") and "/logs/" in lines[-1], lines
    assert not [line for line in lines if any(noise in line for noise in SNAKEMAKE_NOISE)], lines
    # Snakemake's own start-up lines, the sentence and the hint.
    assert len(lines) <= 12, lines
    snakemake_log = lines[-1].split("Snakemake's in ")[1].rstrip(".")
    assert "CalledProcessError" in Path(snakemake_log).read_text(), "the full report stays in Snakemake's log"


def record(message):
    return logging.LogRecord("snakemake.logging", logging.ERROR, __file__, 1, message, (), None)


def test_the_console_filter_drops_only_the_report_of_a_job_that_printed_its_own_line(capsys):
    from ucpflow.console import JOB_FAILED_STATUS, FailedJobReport

    report = FailedJobReport()
    stopped = f"RuleException:\nCalledProcessError in file x, line 1:\nCommand 'python a.py' returned non-zero exit status {JOB_FAILED_STATUS}."
    killed = "RuleException:\nCalledProcessError in file x, line 1:\nCommand 'python a.py' returned non-zero exit status -9."
    assert not report.filter(record(stopped)) and report.filter(record(killed))
    assert not report.filter(record("At least one job did not complete successfully."))
    assert report.filter(record("MissingInputException in rule merge"))
    assert not report.filter(record("RuleException:\nJobFailed in file x, line 3:\nucpflow error: A sentence.\n  File x"))
    assert capsys.readouterr().err == "ucpflow error: A sentence.\n"
    assert report.filter(record("Complete log(s): /x.log"))
    report.failed = True
    assert not report.filter(record("Complete log(s): /x.log"))


def test_sizes_are_printed_in_units_people_read():
    from ucpflow.console import human_size

    assert [human_size(n) for n in (512, 409_600, 34_000_000, 2_113_520_000_000)] == [
        "512 B", "409.60 kB", "34.00 MB", "2.11 TB"]
