"""The demo as a new user runs it, and every target's files (issue 21, items 2-4): a deleted demo is built
and indexed again unattended, nothing stray is left beside the checkpoint, and every file any target writes
has the permissions the user's umask gives (checked under umask 027, where 0644 and 0600 are both wrong)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from export_cases import PER_HEAD_TP2_PP2
from test_demo_kinds import SCHEDULING
from test_umask import modes_under

# The smallest demo DeepSpeed trains in a few seconds: its tag is global_step1.
TINY_DEMO = "demo: {layers: 1, hidden: 32, heads: 2, vocab: 50, seq_len: 8, steps: 1}\n"
UMASK = 0o027


def run(workdir, *args, **config):
    workdir.mkdir(parents=True, exist_ok=True)
    """`snakemake` in `workdir` as a user with umask 027 runs it; the CompletedProcess."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", *args]
    if config:
        command += ["--config", *(f"{key}={value}" for key, value in config.items())]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=env,
                          preexec_fn=lambda: os.umask(UMASK))


def succeeds(workdir, *args, **config):
    result = run(workdir, *args, **config)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


def assert_umask_modes(*roots):
    modes = modes_under(*roots)
    # DeepSpeed's save makes its helper scripts (zero_to_fp32.py) executable for their owner: its file, not ours.
    modes = {mode: [path for path in paths if not (path.suffix == ".py" and mode == 0o740)] for mode, paths in modes.items()}
    modes = {mode: paths for mode, paths in modes.items() if paths}
    wrong = {oct(mode): paths[:3] for mode, paths in modes.items() if mode not in (0o640, 0o750)}
    assert not wrong, wrong
    assert all(path.is_dir() for path in modes.get(0o750, [])) and all(path.is_file() for path in modes.get(0o640, []))


@pytest.mark.deepspeed
def test_the_demo_deleted_is_built_again_with_no_stray_files_and_umask_modes(tmp_path):
    work = tmp_path / "demo-run"
    (tmp_path / "tiny.yaml").write_text(TINY_DEMO)
    tiny = ("--configfile", str(tmp_path / "tiny.yaml"))
    console = succeeds(work, *tiny)
    wrote = [line for line in console.splitlines() if line.startswith("ucpflow: wrote demo/checkpoint/global_step1_universal")]
    assert len(wrote) == 1 and " kB) in " in wrote[0] and "load_universal" in wrote[0], console[-2000:]
    # The whole console (item 5): the profile's and the config's lines, the training's, the index's, one per merge
    # job, what was written, and Snakemake's pointer to its log and the elapsed time; no scheduling lines.
    lines = console.splitlines()
    assert "ucpflow: training the demo checkpoint (gpt) on 2 processes, about a minute..." in lines, lines
    assert len(lines) <= 9 and not [line for line in lines if line.startswith(SCHEDULING)], lines
    succeeds(work, "inspect", *tiny)
    succeeds(work, "verify", *tiny)
    demo = work / "demo"
    assert os.listdir(demo) == ["checkpoint"], "nothing beside the checkpoint folder (no launcher log)"
    saved = {"global_step1", "global_step1_universal", "latest", "latest_universal"}
    deepspeed_scripts = set(os.listdir(demo / "checkpoint")) - saved  # zero_to_fp32.py and the like
    assert saved <= set(os.listdir(demo / "checkpoint")) and all(name.endswith(".py") for name in deepspeed_scripts)
    assert not [path for path in demo.rglob(".*")], "no hidden leftovers in the demo"
    assert (work / "ucpflow-work").is_dir()
    assert_umask_modes(demo, work / "ucpflow-work")

    shutil.rmtree(demo)
    console = succeeds(work, *tiny)
    assert "MissingInputException" not in console
    assert (demo / "checkpoint" / "latest_universal").read_text().strip() == "global_step1_universal"
    succeeds(work, "verify", *tiny)


@pytest.mark.parametrize("target, folder", [("megatron", "megatron"), ("hf", "hf")])
def test_the_exports_write_with_umask_modes(target, folder, megatron_checkpoint, tmp_path):
    name, spec = PER_HEAD_TP2_PP2
    tag = megatron_checkpoint(name, **spec)
    output = tmp_path / "out" / f"{tag.name}_universal"
    console = succeeds(tmp_path / "run", target, input_folder=tag, output_folder=output, target_tp=1, target_pp=1)
    assert (tmp_path / "out" / folder).is_dir()
    next_step = {"hf": "from_pretrained(", "megatron": "--tensor-model-parallel-size 1"}[target]
    wrote = [line for line in console.splitlines() if line.startswith(f"ucpflow: wrote {tmp_path / 'out' / folder} (")]
    assert len(wrote) == 1 and next_step in wrote[0], console[-3000:]
    assert_umask_modes(tmp_path / "out", tmp_path / "run" / "ucpflow-work")
