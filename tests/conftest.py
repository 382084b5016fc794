"""Shared fixtures: real DeepSpeed checkpoints (built once per session) and workflow runners."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
# The tests' model descriptions (ucpflow.export.model_description) go to a cache of their own, not the user's.
os.environ.setdefault("UCPFLOW_CACHE_DIR", tempfile.mkdtemp(prefix="ucpflow-test-cache-"))

from ucpflow.demo.autoep import launch as autoep_launch  # noqa: E402
from ucpflow.demo.autotp import launch as autotp_launch  # noqa: E402
from ucpflow.demo.hftrainer import launch as hftrainer_launch  # noqa: E402
from ucpflow.demo.megatron import launch as megatron_launch  # noqa: E402
from ucpflow.demo.launch import build_checkpoint  # noqa: E402
from ucpflow.demo.launcher import run_deepspeed  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs the single-node SLURM cluster (.ci/slurm-setup.sh)")
    config.addinivalue_line("markers", "deepspeed: trains or converts a real DeepSpeed checkpoint (not in `make test-fast`)")


# Where the checkpoints DeepSpeed trains for the tests come from: every test that needs one is slow.
CHECKPOINT_FIXTURES = {"checkpoint_cache", "deepspeed_checkpoint"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if CHECKPOINT_FIXTURES & fixtures:
            item.add_marker(pytest.mark.deepspeed)
        if "slurm_cluster" in fixtures:
            item.add_marker(pytest.mark.slurm)


@pytest.fixture(scope="session")
def checkpoint_cache(tmp_path_factory):
    """Where built checkpoints live: $UCPFLOW_TEST_CACHE to reuse them across sessions, else a session tmp dir."""
    cached = os.environ.get("UCPFLOW_TEST_CACHE")
    root = Path(cached) if cached else tmp_path_factory.mktemp("checkpoints")
    root.mkdir(parents=True, exist_ok=True)
    return root


def cached_builder(cache, prefix, build_checkpoint_function):
    """A fixture's build(name, **options): the checkpoint is trained once, then reused from `cache`."""

    def build(name, **options):
        save_dir = cache / f"{prefix}{name}"
        done = save_dir / ".complete"
        if not done.exists():
            shutil.rmtree(save_dir, ignore_errors=True)
            build_checkpoint_function(save_dir, timeout=900, **options)
            done.write_text("ok")
        latest = save_dir / "latest"
        if not latest.is_file():  # the HF Trainer's layout: save_dir/checkpoint-N/latest
            latest = next(save_dir.glob("checkpoint-*/latest"))
        return latest.parent / latest.read_text().strip()

    return build


@pytest.fixture(scope="session")
def deepspeed_checkpoint(checkpoint_cache):
    """build(name, num_procs=2, **train_options) -> tag folder of a checkpoint DeepSpeed trained and saved."""
    return cached_builder(checkpoint_cache, "", build_checkpoint)


@pytest.fixture(scope="session")
def megatron_checkpoint(checkpoint_cache):
    """build(name, tp=, pp=, dp=, **options) -> tag folder of a Megatron-DeepSpeed-shaped GPT checkpoint."""
    return cached_builder(checkpoint_cache, "megatron-", megatron_launch.build_checkpoint)


@pytest.fixture(scope="session")
def trainer_checkpoint(checkpoint_cache):
    """build(name, model=, zero_stage=, **options) -> tag folder checkpoint-N/global_stepN of a tiny transformers
    model that DeepSpeed trained, saved as the HF Trainer saves it (config.json in checkpoint-N)."""
    return cached_builder(checkpoint_cache, "hftrainer-", hftrainer_launch.build_checkpoint)


HF_TRAINER_RUN = Path(__file__).with_name("hf_trainer_run.py")
TRAINER_FROZEN = "model.embed_tokens.weight"


def run_hf_trainer(num_procs, log_path, **options):
    """tests/hf_trainer_run.py (the real `transformers.Trainer`) on `num_procs` DeepSpeed ranks."""
    argv = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
    run_deepspeed(HF_TRAINER_RUN, argv + ["--freeze", TRAINER_FROZEN], num_procs=num_procs, log_path=log_path,
                  timeout=600, what=f"running the HF Trainer ({log_path.stem})")


@pytest.fixture(scope="session")
def real_trainer_run(checkpoint_cache):
    """The output_dir of a real `transformers.Trainer` run (DeepSpeed ZeRO-3, bf16, 2 ranks, a frozen embedding)
    saving every step: checkpoint-1, -2 and -3."""

    def build(save_dir, timeout):
        run_hf_trainer(2, save_dir.with_name(save_dir.name + ".log"), output_dir=save_dir, zero_stage=3, max_steps=3,
                       save_steps=1)

    return cached_builder(checkpoint_cache, "", build)("real-hf-trainer-z3-run").parent.parent


@pytest.fixture(scope="session")
def autotp_checkpoint(checkpoint_cache):
    """build(name, tp=, dp=, zero_stage=, **options) -> tag folder of a tiny HF model's AutoTP x ZeRO checkpoint."""
    return cached_builder(checkpoint_cache, "autotp-", autotp_launch.build_checkpoint)


@pytest.fixture(scope="session")
def autoep_checkpoint(checkpoint_cache):
    """build(name, ep=, zero_stage=, **options) -> tag folder of a tiny HF MoE model's AutoEP x ZeRO checkpoint."""
    return cached_builder(checkpoint_cache, "autoep-", autoep_launch.build_checkpoint)


def snakemake(workdir, *args, config=None, check=False, timeout=900):
    """Run the ucpflow workflow in `workdir` (2 cores) and return the CompletedProcess."""
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", *args, "--quiet", "host"]
    if config:
        command += ["--config", *(f"{key}={value}" for key, value in config.items())]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def convert(workdir, input_folder, output_folder, **config):
    return snakemake(workdir, config={"input_folder": input_folder, "output_folder": output_folder, **config}, check=True)


def ds_to_universal(input_folder, output_folder, *flags):
    """DeepSpeed's own converter, the oracle, with 2 extract and 2 merge workers."""
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(input_folder),
               "--output_folder", str(output_folder), "--num_extract_workers", "2", "--num_merge_workers", "2", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"ds_to_universal failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return Path(output_folder)


def copy_tag(tag_folder, destination_root):
    """A private copy of a checkpoint tag folder (and its `latest`), for tests that damage or convert it."""
    destination_root = Path(destination_root)
    destination_root.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tag_folder, destination_root / tag_folder.name)
    (destination_root / "latest").write_text(tag_folder.name)
    return destination_root / tag_folder.name
