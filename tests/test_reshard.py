"""`snakemake reshard`: native DeepSpeed checkpoints for another data-parallel degree, ZeRO stage or precision,
checked against DeepSpeed itself.

Two oracles: a reshard to the source's own degree, stage and precision must reproduce the files DeepSpeed
saved (torch.equal tensors, equal objects), and DeepSpeed launched at the target's degree and stage must
`load_checkpoint` a reshard (without universal loading) to fp32 weights and Adam moments equal to the
universal checkpoint of the source, the source's step, LR and global steps, and train on from there.
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import test_fp16_layout as fp16_layout
import torch
from conftest import TRAINER_FROZEN, convert, copy_tag, run_hf_trainer, snakemake
from universal_compare import compare_objects

from ucpflow import ptfile
from ucpflow.demo.launch import resume_from_universal
from ucpflow.demo.reshard_check import load_and_dump
from ucpflow.ptfile import StreamTensor
from ucpflow.reshard.plan import zero3_slice, zero3_sub_groups, zero12_partition

SOURCES = {
    "z1_bf16_dp2": dict(num_procs=2, zero_stage=1, dtype="bf16"),
    "z3_bf16_dp2": dict(num_procs=2, zero_stage=3, dtype="bf16"),
    "z2_fp32_dp3_odd_frozen": dict(num_procs=3, zero_stage=2, dtype="fp32", hidden=63, heads=3, vocab=499,
                                   freeze=["wpe.weight"]),
    "z2_bf16_dp2_decay_groups": dict(num_procs=2, zero_stage=2, dtype="bf16", decay_groups=True),
}
MODEL_OPTIONS = ("hidden", "heads", "vocab", "freeze", "decay_groups")


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


def check_loaded(dump_path, universal):
    """DeepSpeed's loaded states equal the universal checkpoint of the source; so do the step, the LR and the
    global steps; it trains on to a finite loss."""
    universal = Path(universal)
    dump = torch.load(dump_path, weights_only=False)
    trainable = [name for name in dump["weights"] if name in dump["params"]]
    assert trainable and sorted(dump["params"]) == sorted(trainable)
    for name, states in dump["params"].items():
        for state, loaded in states.items():
            expected = universal_state(universal, name, state)
            # ZeRO-3 universal tensors are flat: compare element by element.
            assert torch.equal(loaded.flatten(), expected.flatten()), (name, state)
    for name, weight in dump["weights"].items():
        if name not in dump["params"] and (universal / "zero" / name).is_dir():  # frozen or tied
            expected = universal_state(universal, name, "fp32").to(weight.dtype)
            assert torch.equal(weight.flatten(), expected.flatten()), name
    model_state = torch.load(sorted(universal.glob("*model_states.pt"))[0], weights_only=False)
    optimizer_state = torch.load(universal / "zero" / "optimizer_state.pt", weights_only=False)
    steps = model_state["global_steps"]
    assert dump["steps"] == [float(steps)]
    assert dump["engine"]["global_steps"] == steps and dump["engine"]["skipped_steps"] == 0
    assert dump["engine"]["lr"] == [group["lr"] for group in optimizer_state["param_groups"]]
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
    "z2_two_groups_dp2_to_z3_dp3": ("z2_bf16_dp2_decay_groups", 3, 3),
}
UNIVERSAL_LOSS_CASE = "z1_dp2_to_z1_dp3"


@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_loads_the_reshard(sources, case, tmp_path):
    name, dp, stage = CASES[case]
    source = sources(name)
    folder = tmp_path / "reshard"
    source.reshard(folder, target_dp=dp, target_zero_stage=stage)
    dtype = SOURCES[name]["dtype"]
    dump = load_and_dump(folder, tmp_path / "dump.pt", num_procs=dp, zero_stage=stage, dtype=dtype,
                         **source.model_options())
    loaded = check_loaded(dump, source.universal)
    if case == UNIVERSAL_LOSS_CASE:
        # One more step from the universal checkpoint at the same degree and stage: the same loss.
        losses = resume_from_universal(source.universal.parent, num_procs=dp, losses_out=tmp_path / "universal.json",
                                       steps=1, zero_stage=stage, dtype=dtype, **source.model_options())
        assert losses == loaded["losses"]


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
    # A lost rank file is written again, alone, and `latest` after it.
    model_file = folder / source.tag.name / names[0]
    written = model_file.stat().st_mtime_ns
    (folder / source.tag.name / names[1]).unlink()
    source.reshard(folder, target_dp=1, target_zero_stage=2, target_dtype="fp32")
    assert sorted(p.name for p in (folder / source.tag.name).iterdir()) == names
    assert model_file.stat().st_mtime_ns == written
    assert (folder / "latest").stat().st_mtime_ns >= (folder / source.tag.name / names[1]).stat().st_mtime_ns


def reshard_refusal(workdir, **config):
    """stderr of a reshard run that must fail, and whether it wrote anything into the reshard folder."""
    result = snakemake(workdir, "reshard", config=config)
    assert result.returncode != 0
    return result.stderr


@pytest.mark.parametrize("key, value, phrase", [
    ("target_dp", 0, "Config key `target_dp`: 0 is less than the minimum of 1."),
    ("target_zero_stage", 4, "Config key `target_zero_stage`: 4 is not one of"),
    ("target_zero_stage", 0, "Config key `target_zero_stage`: 0 is not one of"),
    ("target_dtype", "fp8", "Config key `target_dtype`: 'fp8' is not one of"),
])
def test_a_target_deepspeed_cannot_load_is_refused_by_the_config(tmp_path, key, value, phrase):
    source = tmp_path / "checkpoint" / "global_step4"
    source.mkdir(parents=True)
    folder = tmp_path / "reshard"
    stderr = reshard_refusal(tmp_path / "run", input_folder=source, output_folder=tmp_path / "universal",
                             reshard_folder=folder, **{key: value})
    assert phrase in stderr
    assert not folder.exists() and not (tmp_path / "universal").exists()


@pytest.mark.parametrize("where", ["inside", "parent"])
def test_a_reshard_folder_inside_or_holding_the_input_is_refused(tmp_path, where):
    source = tmp_path / "checkpoint" / "global_step4"
    source.mkdir(parents=True)
    folder = source / "resharded" if where == "inside" else source.parent
    stderr = reshard_refusal(tmp_path / "run", input_folder=source, output_folder=tmp_path / "universal",
                             reshard_folder=folder, target_dp=3)
    assert f"ucpflow error: Config key `reshard_folder`: {folder}" in stderr
    assert sorted(p.name for p in source.parent.rglob("*")) == ["global_step4"]


def test_fp16_from_a_bf16_source_is_refused_before_anything_is_written(deepspeed_checkpoint, tmp_path):
    tag = copy_tag(deepspeed_checkpoint("z1_bf16_dp2", **SOURCES["z1_bf16_dp2"]), tmp_path / "checkpoint")
    folder = tmp_path / "reshard"
    stderr = reshard_refusal(tmp_path / "run", input_folder=tag, output_folder=tmp_path / "universal" / "u",
                             reshard_folder=folder, target_dtype="fp16")
    assert "ucpflow error: Config key `target_dtype`: " in stderr and "was trained in bf16" in stderr
    assert not folder.exists()


def test_a_tensor_parallel_source_is_refused_with_a_pointer_to_the_universal_checkpoint(megatron_checkpoint, tmp_path):
    tag = copy_tag(megatron_checkpoint("t2p1d2", tp=2, pp=1, dp=2), tmp_path / "checkpoint")
    folder = tmp_path / "reshard"
    stderr = reshard_refusal(tmp_path / "run", input_folder=tag, output_folder=tmp_path / "universal" / "u",
                             reshard_folder=folder, target_dp=1)
    assert "is a tensor/pipeline-parallel checkpoint (tp=2, pp=1), which reshard does not write" in stderr
    assert '"load_universal": true' in stderr
    assert not folder.exists()


class NotAllowed:
    """A class no allowlist names: a pickle of it stands for the HF Trainer's training_args.bin."""


LLAMA = dict(model="llama", zero_stage=3, dtype="bf16", freeze=["model.embed_tokens.weight"])


def test_hf_trainer_layout_reshards_and_carries_its_side_files(trainer_checkpoint, tmp_path):
    """A transformers llama (ZeRO-3, bf16, a frozen embedding) saved in the HF Trainer's checkpoint-N layout:
    the reshard to its own layout is DeepSpeed's files, and the files beside the tag folder are carried,
    except a pickle naming a global outside the allowlist, which the run names."""
    tag = trainer_checkpoint("llama_z3_bf16_frozen", **LLAMA)
    source = tmp_path / tag.parent.name
    shutil.copytree(tag.parent, source)
    (source / "trainer_state.json").write_text('{"global_step": 2}\n')
    torch.save({"base_lrs": [0.01], "last_epoch": 2, "_step_count": 3}, source / "scheduler.pt")
    torch.save({"args": NotAllowed()}, source / "training_args.bin")
    folder = tmp_path / "resharded"
    result = snakemake(tmp_path / "run", "reshard", check=True,
                       config={"input_folder": source, "output_folder": tmp_path / "universal" / "u",
                               "reshard_folder": folder})
    assert "not carried: training_args.bin (it names `test_reshard.NotAllowed`" in result.stderr
    assert file_differences(folder / tag.name, tag) == []
    carried = sorted(p.name for p in folder.iterdir())
    assert carried == sorted(["config.json", "generation_config.json", "latest", "scheduler.pt", tag.name,
                              "trainer_state.json", "zero_to_fp32.py", "zero_to_torch.py"])
    assert torch.load(folder / "scheduler.pt", weights_only=True)["last_epoch"] == 2


@pytest.fixture(scope="module")
def hf_trainer_checkpoint(real_trainer_run):
    """checkpoint-2 of a real `transformers.Trainer` run (DeepSpeed ZeRO-3, bf16, 2 ranks, a frozen embedding)."""
    return real_trainer_run / "checkpoint-2"


def test_hf_trainer_resumes_a_reshard_at_another_degree_and_stage(hf_trainer_checkpoint, tmp_path):
    """A real HF Trainer checkpoint (ZeRO-3, DP2) resharded to ZeRO-2 DP1: `Trainer.train(resume_from_checkpoint=)`
    at one rank loads it (DeepSpeed's plain load_checkpoint, through the Trainer) with every state equal to the
    universal checkpoint of the source, and trains on from step 2."""
    folder, universal = tmp_path / "dp1", tmp_path / "universal" / "u"
    result = snakemake(tmp_path / "run", "reshard", check=True,
                       config={"input_folder": hf_trainer_checkpoint, "output_folder": universal,
                               "reshard_folder": folder, "target_dp": 1, "target_zero_stage": 2})
    assert "not carried: training_args.bin" in result.stderr
    assert {"trainer_state.json", "scheduler.pt", "config.json", "latest"} <= {p.name for p in folder.iterdir()}
    # The reshard reads the rank files themselves: the universal checkpoint to compare with is converted now.
    assert not universal.exists()
    convert(tmp_path / "run", hf_trainer_checkpoint, universal)

    dump_path = tmp_path / "resumed.pt"
    run_hf_trainer(1, tmp_path / "resumed.log", output_dir=tmp_path / "resumed", zero_stage=2, max_steps=3,
                   resume=folder, dump=dump_path)
    dump = check_loaded(dump_path, universal)
    assert TRAINER_FROZEN not in dump["params"] and TRAINER_FROZEN in dump["weights"]
    assert (dump["trainer_step_at_start"], dump["trainer_step_at_end"], len(dump["losses"])) == (2, 3, 1)

def tensor_bytes(path):
    """Bytes of the distinct storages a .pt file holds."""
    storages = {}

    def walk(value):
        if torch.is_tensor(value):
            storage = value.untyped_storage()
            storages[storage.data_ptr(), storage.nbytes()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(torch.load(path, weights_only=False))
    return sum(storages.values())


@pytest.mark.parametrize("dp, stage", [(3, 1), (2, 3)])
def test_inspect_reshard_tells_the_files_and_bytes_a_reshard_writes(sources, tmp_path, dp, stage):
    source = sources("z2_fp32_dp3_odd_frozen")
    folder = tmp_path / "reshard"
    source.reshard(folder, target_dp=dp, target_zero_stage=stage)
    config = {"input_folder": source.input, "output_folder": source.universal, "target_dp": dp,
              "target_zero_stage": stage, "inspect_folder": tmp_path / "inspect"}
    snakemake(source.root / "run", "inspect_reshard", config=config, check=True)
    rows = [line.split("|")[1:-1] for line in (tmp_path / "inspect" / "reshard.md").read_text().splitlines()
            if line.startswith("| ") and "_states.pt" in line]
    told = {name.strip(): int(size.replace(",", "")) for name, _, _, size in rows}
    written = {path.name: tensor_bytes(path) for path in (folder / source.tag.name).glob("*.pt")}
    assert told == written


@pytest.mark.parametrize("dp", [1, 2, 3, 7, 64])
def test_partitions_cover_every_element_once(dp):
    """Over all ranks, the ZeRO-1/2 and ZeRO-3 partitions hold every element of every parameter exactly once,
    at DeepSpeed's sizes: a multiple of 2 x dp for the flat ZeRO-1/2 group, ceil(numel / dp) per ZeRO-3 slice."""
    numels = [5, 1, 64, 499 * 63, 7, 3]
    seen = {index: [] for index in range(len(numels))}
    sizes = set()
    for rank in range(dp):
        partition = zero12_partition(numels, dp, rank)
        sizes.add(partition.numel)
        for piece in partition.pieces:
            assert 0 <= piece.offset and piece.offset + piece.count <= partition.numel - partition.padding
            seen[piece.param].append((piece.start, piece.count))
    assert len(sizes) == 1 and (sizes.pop() * dp) % (2 * dp) == 0
    for index, numel in enumerate(numels):
        assert sorted(seen[index])[0][0] == 0 and sum(count for _, count in seen[index]) == numel
    groups = zero3_sub_groups(numels, dp, sub_group_size=40)
    assert [index for group in groups for index in group] == list(range(len(numels)))
    for index, numel in enumerate(numels):
        covered = sum(zero3_slice(numel, dp, rank)[2] for rank in range(dp))
        assert covered == numel and zero3_slice(numel, dp, 0)[0] == math.ceil(numel / dp)


def test_a_streamed_tensor_is_written_piece_by_piece_and_loads_equal(tmp_path):
    values = np.arange(10_000, dtype=np.float32)
    pieces = []

    def chunks():
        for start in range(0, values.size, 3_000):
            pieces.append(start)
            yield values[start:start + 3_000].view(np.uint8)

    ptfile.save({"flat": StreamTensor("float32", (100, 100), chunks)}, tmp_path / "streamed.pt")
    assert pieces == [0, 3_000, 6_000, 9_000]
    loaded = torch.load(tmp_path / "streamed.pt", weights_only=True)["flat"]
    assert torch.equal(loaded, torch.from_numpy(values).reshape(100, 100))


def test_fp16_layout_reshards_to_deepspeeds_fp16_files(deepspeed_checkpoint, tmp_path):
    """The fp16 layout (test_fp16_layout's rewrite of a trained fp32 save; CPU DeepSpeed refuses to train fp16):
    a reshard to its own degree and stage in fp16 is the same files, under the names DeepSpeed 0.19 gives
    an fp16 engine's optimizer files (zero_pp_rank_*, the fp16_ prefix being an older DeepSpeed's)."""
    tag = copy_tag(deepspeed_checkpoint("z2_fp32_frozen", num_procs=2, zero_stage=2, dtype="fp32",
                                        freeze=["wpe.weight"]), tmp_path / "checkpoint")
    fp16_layout.rewrite_as_fp16(tag)
    folder = tmp_path / "reshard"
    result = snakemake(tmp_path / "run", "reshard", check=True,
                       config={"input_folder": tag, "output_folder": tmp_path / "universal" / "u",
                               "reshard_folder": folder})
    assert "2 ranks at ZeRO-2 fp16" in result.stderr
    # What an fp16 engine saves beyond the rewrite: fp16 frozen fragments, and its config's fp16 section.
    expected = tmp_path / "expected"
    expected.mkdir()
    for path in tag.glob("*.pt"):
        state = ptfile.load(path)
        state["ds_config"]["fp16"] = {"enabled": True}
        fragments = state.get("frozen_param_fragments") or {}
        for name, tensor in fragments.items():
            fragments[name] = ptfile.ArrayTensor(tensor.read_array().astype(np.float16), "float16")
        ptfile.save(state, expected / path.name.removeprefix("fp16_"))
    assert file_differences(folder / tag.name, expected) == []


BF16_OPTIMIZER_KEYS = ("clip_grad", "base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings",
                       "partition_count", "ds_version", "param_slice_mappings")  # BF16_Optimizer.state_dict()


def test_bf16_optimizer_layout_reshards_to_the_zero_optimizers_files(deepspeed_checkpoint, tmp_path):
    """A ZeRO-1 bf16 save rewritten into BF16_Optimizer's state layout (no loss scaler, no zero_stage: what
    DeepSpeed writes with "grad_accum_dtype": "fp32") reshards to the files its ZeRO optimizer saved."""
    original = deepspeed_checkpoint("z1_bf16_dp2", **SOURCES["z1_bf16_dp2"])
    tag = copy_tag(original, tmp_path / "checkpoint")
    for path in tag.glob("*optim_states.pt"):
        state = ptfile.load(path)
        optim = state["optimizer_state_dict"]
        state["optimizer_state_dict"] = {key: optim[key] for key in BF16_OPTIMIZER_KEYS}
        ptfile.save(state, path)
    folder = tmp_path / "reshard"
    snakemake(tmp_path / "run", "reshard", check=True,
              config={"input_folder": tag, "output_folder": tmp_path / "universal" / "u", "reshard_folder": folder})
    assert file_differences(folder / tag.name, original) == []
