"""`snakemake reshard`: native DeepSpeed checkpoints for another data-parallel degree, ZeRO stage or precision,
checked against DeepSpeed itself.

Two oracles: a reshard to the source's own degree, stage and precision must reproduce the files DeepSpeed
saved (torch.equal tensors, equal objects), and DeepSpeed launched at the target's degree and stage must
`load_checkpoint` a reshard (without universal loading) to fp32 weights and Adam moments equal to the
universal checkpoint of the source, the source's step, LR and global steps, and train on from there.
"""

import math
from pathlib import Path

import pytest
import torch
from conftest import convert, copy_tag, snakemake
from universal_compare import compare_objects

from ucpflow.demo.reshard_check import load_and_dump

SOURCES = {
    "z1_bf16_dp2": dict(num_procs=2, zero_stage=1, dtype="bf16"),
    "z3_bf16_dp2": dict(num_procs=2, zero_stage=3, dtype="bf16"),
    "z2_fp32_dp3_odd_frozen": dict(num_procs=3, zero_stage=2, dtype="fp32", hidden=63, heads=3, vocab=499,
                                   freeze=["wpe.weight"]),
}
MODEL_OPTIONS = ("hidden", "heads", "vocab", "freeze")


class Source:
    """A DeepSpeed checkpoint, its universal conversion and a work folder to reshard it from."""

    def __init__(self, name, tag, root):
        self.name, self.tag, self.root = name, tag, root
        self.input = copy_tag(tag, root / "checkpoint")
        self.universal = root / "universal" / f"{tag.name}_universal"
        convert(root / "run", self.input, self.universal)

    def reshard(self, folder, check=True, **config):
        result = snakemake(self.root / "run", "reshard", check=check,
                           config={"input_folder": self.input, "output_folder": self.universal,
                                   "reshard_folder": folder, **config})
        return result

    def model_options(self):
        return {key: value for key, value in SOURCES[self.name].items() if key in MODEL_OPTIONS}


@pytest.fixture(scope="module")
def sources(deepspeed_checkpoint, tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            made[name] = Source(name, deepspeed_checkpoint(name, **SOURCES[name]), tmp_path_factory.mktemp(name))
        return made[name]

    return get


def file_differences(ours, theirs):
    """Differences between two tag folders' .pt files (names and contents)."""
    problems = []
    names_ours = sorted(p.name for p in Path(ours).glob("*.pt"))
    names_theirs = sorted(p.name for p in Path(theirs).glob("*.pt"))
    if names_ours != names_theirs:
        problems.append(f"files differ: {names_ours} vs {names_theirs}")
    for name in sorted(set(names_ours) & set(names_theirs)):
        compare_objects(torch.load(Path(ours) / name, weights_only=False),
                        torch.load(Path(theirs) / name, weights_only=False), name, problems)
    return problems


def universal_state(universal, name, state):
    value = torch.load(Path(universal) / "zero" / name / f"{state}.pt", weights_only=False)
    return value["param"] if isinstance(value, dict) else value


def check_loaded(dump_path, source, steps=4):
    """DeepSpeed's loaded states equal the source's universal checkpoint; it trains on to a finite loss."""
    dump = torch.load(dump_path, weights_only=False)
    trainable = [name for name in dump["weights"] if name in dump["params"]]
    assert trainable and sorted(dump["params"]) == sorted(trainable)
    for name, states in dump["params"].items():
        for state, loaded in states.items():
            expected = universal_state(source.universal, name, state)
            # ZeRO-3 universal tensors are flat: compare element by element.
            assert torch.equal(loaded.flatten(), expected.flatten()), (name, state)
    for name, weight in dump["weights"].items():
        if name not in dump["params"] and (source.universal / "zero" / name).is_dir():  # frozen or tied
            expected = universal_state(source.universal, name, "fp32").to(weight.dtype)
            assert torch.equal(weight.flatten(), expected.flatten()), name
    assert dump["steps"] == [float(steps)]
    assert dump["engine"]["global_steps"] == steps and dump["engine"]["skipped_steps"] == 0
    assert dump["engine"]["lr"] == [1e-3]
    assert all(math.isfinite(loss) for loss in dump["losses"])
    return dump


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_reshard_to_the_same_layout_writes_deepspeeds_own_files(sources, name, tmp_path):
    source = sources(name)
    folder = tmp_path / "same"
    source.reshard(folder)
    assert (folder / "latest").read_text() == source.tag.name
    assert file_differences(folder / source.tag.name, source.tag) == []
    assert {p.name for p in folder.iterdir()} == {source.tag.name, "latest", "zero_to_fp32.py", "zero_to_torch.py"}


CASES = {
    # (source, target dp, target stage)
    "z1_dp2_to_z1_dp3": ("z1_bf16_dp2", 3, 1),
    "z1_dp2_to_z3_dp1": ("z1_bf16_dp2", 1, 3),
    "z3_dp2_to_z2_dp2": ("z3_bf16_dp2", 2, 2),
    "z3_dp2_to_z3_dp3": ("z3_bf16_dp2", 3, 3),
    "z2_fp32_odd_frozen_dp3_to_z2_dp2": ("z2_fp32_dp3_odd_frozen", 2, 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_loads_the_reshard(sources, case, tmp_path):
    name, dp, stage = CASES[case]
    source = sources(name)
    folder = tmp_path / "reshard"
    source.reshard(folder, target_dp=dp, target_zero_stage=stage)
    dtype = SOURCES[name]["dtype"]
    dump = load_and_dump(folder, tmp_path / "dump.pt", num_procs=dp, zero_stage=stage, dtype=dtype,
                         **source.model_options())
    check_loaded(dump, source)


def test_round_trip_gives_back_deepspeeds_files(sources, tmp_path):
    """ZeRO-1 DP2 -> ZeRO-3 DP3 -> (its universal checkpoint) -> ZeRO-1 DP2: the files DeepSpeed saved."""
    source = sources("z1_bf16_dp2")
    there = tmp_path / "there"
    source.reshard(there, target_dp=3, target_zero_stage=3)
    back_universal = tmp_path / "there_universal" / "global_step4_universal"
    convert(tmp_path / "run", there / source.tag.name, back_universal)
    back = tmp_path / "back"
    snakemake(tmp_path / "run", "reshard", check=True,
              config={"input_folder": there / source.tag.name, "output_folder": back_universal,
                      "reshard_folder": back, "target_dp": 2, "target_zero_stage": 1})
    assert file_differences(back / source.tag.name, source.tag) == []


def test_a_second_run_with_another_degree_leaves_only_the_new_files(sources, tmp_path):
    source = sources("z1_bf16_dp2")
    folder = tmp_path / "reshard"
    source.reshard(folder, target_dp=3)
    source.reshard(folder, target_dp=1, target_zero_stage=2, target_dtype="fp32")
    names = sorted(p.name for p in (folder / source.tag.name).iterdir())
    assert names == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    state = torch.load(folder / source.tag.name / names[0], weights_only=False)
    assert state["dp_world_size"] == 1 and state["ds_config"]["zero_optimization"]["stage"] == 2
    assert all(t.dtype == torch.float32 for t in state["module"].values())
    again = source.reshard(folder, target_dp=1, target_zero_stage=2, target_dtype="fp32")
    assert "Nothing to be done" in again.stdout + again.stderr
