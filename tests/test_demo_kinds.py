"""Issue 21, items 5 and 7: a demo for each export (`demo.kind`), `inspect` saying which targets apply to a
checkpoint and why the others do not, and a console without Snakemake's scheduling lines."""

import json
import logging

import pytest
from conftest import snakemake
from snakemake.utils import validate
from test_first_hour import SCHEMA, SNAKEMAKE_NOISE, console, failure_sentence, fake_tag, settings

from ucpflow.console import FailedJobReport
from ucpflow.demo import DEMO_KINDS, training_line
from ucpflow.export.overview import targets_overview
from ucpflow.source.signature import workflow_signature

# What Snakemake prints about its scheduling, none of which a default run shows.
SCHEDULING = ("Select jobs to execute...", "Execute ", "Building DAG of jobs...", "Using shell:",
              "Conda environments: ignored", "Assuming unrestricted shared filesystem usage.",
              "DAG of jobs will be updated after completion.", "Updating checkpoint dependencies.",
              "check individual jobs above")


def test_each_demo_kind_has_its_own_folder_and_work_folder():
    chosen = {kind: settings(demo={"kind": kind}) for kind in DEMO_KINDS}
    assert chosen["gpt"].input_folder == "demo/checkpoint"  # today's demo, where it always was
    assert chosen["hf_llama"].input_folder == "demo/hf_llama/checkpoint-4"  # the HF Trainer's layout
    assert chosen["megatron_llama"].input_folder == "demo/megatron_llama"
    assert all(demo.builds_demo for demo in chosen.values())
    for attribute in ("input_folder", "output_folder", "hf_folder", "megatron_folder", "work_folder"):
        assert len({getattr(demo, attribute) for demo in chosen.values()}) == len(DEMO_KINDS), attribute
    signatures = set()
    for kind, demo in chosen.items():
        config = {"demo": {"kind": kind}}
        validate(config, schema=str(SCHEMA), set_default=True)  # every key, with the schema's defaults
        signatures.add(workflow_signature(config, demo.input_folder, True))
    assert len(signatures) == len(DEMO_KINDS)
    assert settings(demo={"kind": "hf_llama", "folder": "elsewhere"}).input_folder == "elsewhere/checkpoint-4"


def test_demo_options_its_trainer_cannot_build_are_refused_in_one_sentence(tmp_path):
    sentence = failure_sentence(tmp_path / "work", config={"demo": "{kind: megatron_llama, zero_stage: 3}"})
    assert "`demo.zero_stage`" in sentence and "megatron_llama" in sentence and "stage 1" in sentence
    sentence = failure_sentence(tmp_path / "work", config={"demo": "{kind: nemo}"})
    assert "`demo.kind`" in sentence and "gpt" in sentence, sentence


def test_the_demo_training_announces_itself():
    line = training_line({"kind": "hf_llama", "num_procs": 2})
    assert line == "ucpflow: training the demo checkpoint (hf_llama) on 2 processes, about a minute..."


def test_inspect_says_which_targets_apply_to_a_plain_deepspeed_or_a_transformers_model(tmp_path):
    plain = targets_overview(None, None, [], None)
    assert [line.split(":")[0] for line in plain] == ["hf", "megatron"]
    assert all(": does not apply: " in line for line in plain) and "config.json" in plain[0], plain
    assert "Megatron-LM args" in plain[1]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    transformers = targets_overview({}, None, [], tmp_path)
    assert transformers[0].startswith("hf: applies: a transformers model (LlamaForCausalLM, ")
    assert transformers[1].startswith("megatron: does not apply: ") and "Megatron-LM args" in transformers[1]


def record(message):
    return logging.LogRecord("snakemake.logging", logging.INFO, __file__, 1, message, (), None)


def test_the_console_filter_drops_snakemakes_scheduling_lines(capsys):
    report = FailedJobReport()
    for line in SCHEDULING[:-1]:
        assert not report.filter(record(line + ("3 jobs..." if line == "Execute " else ""))), line
    assert report.filter(record("Execute this: a line of a job's own"))
    assert report.filter(record("ucpflow: merge b0000: merged 10 parameters in 0.1 s"))
    reasons = "Reasons:\n    (check individual jobs above for details)\n    output files have to be generated:\n        index"
    assert not report.filter(record(reasons))
    assert capsys.readouterr().err == "Reasons:\n    output files have to be generated:\n        index\n"


def test_a_dry_run_shows_no_scheduling_lines_and_verbose_shows_them(tmp_path):
    tag = fake_tag(tmp_path / "run" / "global_step4")
    returncode, lines = console(tmp_path / "work", "-n", config={"input_folder": tag})
    assert returncode == 0, lines
    assert not [line for line in lines if any(noise in line for noise in SCHEDULING + SNAKEMAKE_NOISE)], lines
    assert any("index" in line for line in lines) and len(lines) <= 12, lines
    returncode, lines = console(tmp_path / "work", "-n", "--verbose", config={"input_folder": tag})
    assert returncode == 0 and "Building DAG of jobs..." in lines, lines


def exported_architecture(folder):
    return json.loads((folder / "config.json").read_text())["architectures"]


@pytest.mark.deepspeed
@pytest.mark.parametrize("kind, targets", [("hf_llama", ("hf",)), ("megatron_llama", ("megatron", "hf"))])
def test_each_export_has_a_demo(kind, targets, checkpoint_cache, tmp_path):
    # The demo is trained once into the test cache; what the workflow writes goes under tmp_path.
    demo = f"{{kind: {kind}, folder: {checkpoint_cache / f'demo-{kind}'}}}"
    config = {"demo": demo, "output_folder": tmp_path / "out" / "universal"}
    result = snakemake(tmp_path / "work", *targets, config=config)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).splitlines()
    for folder in (tmp_path / "out" / target for target in targets):
        assert [line for line in lines if line.startswith(f"ucpflow: wrote {folder} (")], lines
    assert not [line for line in lines if any(noise in line for noise in SCHEDULING)], lines
    assert exported_architecture(tmp_path / "out" / "hf") == ["LlamaForCausalLM"]
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()
    if "megatron" in targets:
        assert (tmp_path / "out" / "megatron" / "latest_checkpointed_iteration.txt").is_file()
        assert list((tmp_path / "out" / "megatron").glob("iter_*/mp_rank_00/model_optim_rng.pt"))
    inspected = snakemake(tmp_path / "work", "inspect", config=config)
    assert inspected.returncode == 0, inspected.stderr[-3000:]
    hf_line = [line.strip() for line in inspected.stdout.splitlines() if line.strip().startswith("hf: ")]
    # The HF Trainer's config.json of a model built from its config names no architectures, only its model_type.
    expected = "hf: applies: a transformers model (model_type llama" if kind == "hf_llama" else "hf: LlamaForCausalLM"
    assert len(hf_line) == 1 and hf_line[0].startswith(expected), inspected.stdout


def test_nested_command_line_values_are_read_as_the_schema_types():
    from ucpflow.config import coerce_command_line_values

    # `--config 'demo={kind: megatron_llama, num_procs: 4}' strict=false` as Snakemake hands it over.
    config = {"demo": {"kind": "megatron_llama", "num_procs": "4", "folder": "7"}, "strict": "false", "retries": "2"}
    coerce_command_line_values(config, SCHEMA)
    assert config == {"demo": {"kind": "megatron_llama", "num_procs": 4, "folder": "7"}, "strict": False,
                      "retries": 2}
