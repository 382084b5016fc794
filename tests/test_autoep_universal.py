"""DeepSpeed AutoEP (expert-parallel MoE) x ZeRO-1/2/3 checkpoints of tiny Hugging Face models, converted
by ucpflow and by ds_to_universal: identical; DeepSpeed resumes from both at EP1 and EP2 with equal losses.

Each case trains 2 layers of 4 experts (top-2, hidden 32) on 2 CPU processes at EP2 for 2 steps, once
per session (about 20 s): every rank holds 2 experts of each layer as fused w1/w2/w3 tensors.
"""

import pytest
import torch
from conftest import convert, copy_tag, ds_to_universal, snakemake
from universal_compare import compare_universal, resume_from_ours

from ucpflow.demo.autoep.launch import resume_from_universal
from ucpflow.errors import CheckpointError
from ucpflow.source.fragments import build_index
from ucpflow.inspect import inspect_checkpoint

CASES = {
    "mixtral_z1_fp32": dict(model="mixtral", ep=2, zero_stage=1, dtype="fp32"),
    "mixtral_z2_bf16": dict(model="mixtral", ep=2, zero_stage=2, dtype="bf16"),
    "qwen3_z2_bf16": dict(model="qwen3_moe", ep=2, zero_stage=2, dtype="bf16"),
    # partition-native: each rank's zero_pp_rank_* files hold its experts, no per-expert files
    "mixtral_z3_fp32": dict(model="mixtral", ep=2, zero_stage=3, dtype="fp32"),
}
# (case, AutoEP degree of the resumed run)
RESUMES = [("mixtral_z1_fp32", 1), ("mixtral_z1_fp32", 2), ("mixtral_z3_fp32", 1)]
EXPERT = "model.layers.1.mlp.experts.w2"


@pytest.fixture(scope="module")
def converted(autoep_checkpoint, tmp_path_factory):
    """converted(case) -> (ours, theirs, config): the case converted by ucpflow and by ds_to_universal, once."""
    conversions = {}

    def convert_both(case):
        if case not in conversions:
            tag = autoep_checkpoint(case, **CASES[case])
            root = tmp_path_factory.mktemp(f"autoep-{case}")
            source = copy_tag(tag, root / "checkpoint")
            ours = root / "ours" / f"{tag.name}_universal"
            config = {"input_folder": source, "output_folder": ours, "work_folder": root / "work"}
            convert(root / "run", source, ours, work_folder=root / "work")
            theirs = ds_to_universal(source, root / "theirs" / f"{tag.name}_universal")
            conversions[case] = (ours, theirs, config)
        return conversions[case]

    return convert_both


def test_checkpoint_has_the_autoep_layout_under_test(autoep_checkpoint):
    tag = autoep_checkpoint("mixtral_z1_fp32", **CASES["mixtral_z1_fp32"])
    model_state = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=False)
    layers = model_state["ds_autoep_layers"]
    assert [(layer["num_experts"], layer["num_local_experts"], layer["ep_size"]) for layer in layers] == [(4, 2, 2)] * 2
    assert model_state["param_shapes"][1][EXPERT] == torch.Size([2, 32, 64])
    assert sorted(p.name for p in tag.glob("layer_*_expert_*")) == [
        f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt" for layer in range(2) for expert in range(4)]


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_ds_to_universal(case, converted):
    ours, theirs, _ = converted(case)
    assert compare_universal(ours, theirs, ours.parent / "latest_universal", theirs.parent / "latest_universal") == []


def test_expert_tensor_stacks_every_ep_ranks_experts(converted, autoep_checkpoint):
    ours, _, _ = converted("mixtral_z1_fp32")
    saved = torch.load(ours / "zero" / EXPERT / "fp32.pt", weights_only=False)
    assert (saved["is_expert_param"], saved["ep_num_experts"], saved["cat_dim"]) == (True, 4, 0)
    tag = autoep_checkpoint("mixtral_z1_fp32", **CASES["mixtral_z1_fp32"])
    for expert in range(4):  # fp32 training: the master weights are the model's expert weights
        weights = torch.load(tag / f"layer_1_expert_{expert}_mp_rank_00_model_states.pt", weights_only=False)
        assert torch.equal(saved["param"][expert], weights[f"{EXPERT}.{expert}"])


def test_verify_checks_the_expert_parameters(converted):
    ours, _, config = converted("mixtral_z2_bf16")
    snakemake(config["output_folder"].parent.parent / "run", "verify", config=config, check=True)
    report = (config["work_folder"] / "verify" / "report.tsv").read_text().splitlines()
    expert_rows = [line.split("\t") for line in report if line.startswith(EXPERT + "\t")]
    assert sorted(row[1] for row in expert_rows) == ["exp_avg", "exp_avg_sq", "fp32", "step"]
    assert {row[4] for row in expert_rows} == {"ok"}

    # Experts in the wrong order (the first two swapped) keep every element, but not its place.
    path = ours / "zero" / EXPERT / "fp32.pt"
    original = path.read_bytes()
    state = torch.load(path, weights_only=False)
    state["param"] = state["param"][[1, 0, *range(2, state["param"].shape[0])]].clone()
    torch.save(state, path)
    try:
        result = snakemake(config["output_folder"].parent.parent / "run", "verify", "--forcerun", "verify", config=config)
    finally:
        path.write_bytes(original)
    assert result.returncode != 0 and EXPERT in result.stderr


@pytest.mark.parametrize("case, ep", RESUMES)
def test_resume_at_ep_degree(case, ep, converted, tmp_path):
    ours, theirs, _ = converted(case)
    options = {key: CASES[case][key] for key in ("model", "dtype", "zero_stage")}
    resume_from_ours(ours, theirs, lambda root: resume_from_universal(
        root, ep=ep, losses_out=tmp_path / "ours.json", steps=2, **options))


def test_inspect_shows_experts_by_ep_rank(autoep_checkpoint):
    tag = autoep_checkpoint("mixtral_z1_fp32", **CASES["mixtral_z1_fp32"])
    summary, tables = inspect_checkpoint(tag)
    assert summary["blockers"] == []
    assert (summary["moe_layers"], summary["experts"], summary["ep_size"]) == (2, 4, 2)
    experts = tables["experts"].set_index("param")
    assert len(experts) == 6
    assert experts.loc[EXPERT, "placement"] == "ep 0: experts 0-1 (dp 0); ep 1: experts 2-3 (dp 1)"
    assert experts.loc[EXPERT, "bytes"] == 4 * 32 * 64 * 4 * 3
    parameters = tables["parameters"].set_index("param")
    assert parameters.loc[EXPERT, "shape"] == "4x32x64" and parameters.loc[EXPERT, "tp_merge"] == "AutoEP experts"
    assert set(tables["files"].loc[tables["files"]["kind"] == "expert", "layer"]) == {0, 1}


def test_missing_expert_file_is_one_sentence(autoep_checkpoint, tmp_path):
    tag = copy_tag(autoep_checkpoint("mixtral_z1_fp32", **CASES["mixtral_z1_fp32"]), tmp_path / "checkpoint")
    (tag / "layer_1_expert_3_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"^Expert checkpoint file not found: layer_1 expert_3 in "):
        build_index(tag)


def _rewrite_zero3_model_states(tag, change):
    for path in tag.glob("zero_pp_rank_*_model_states.pt"):
        state = torch.load(path, weights_only=False)
        change(state)
        torch.save(state, path)


def test_zero3_autoep_not_partition_native_is_deepspeeds_sentence(autoep_checkpoint, tmp_path):
    tag = copy_tag(autoep_checkpoint("mixtral_z3_fp32", **CASES["mixtral_z3_fp32"]), tmp_path / "checkpoint")

    def legacy_format(state):
        for layer in state["ds_autoep_layers"]:
            layer["checkpoint_format"] = "per_expert_files"

    _rewrite_zero3_model_states(tag, legacy_format)
    with pytest.raises(CheckpointError, match="Stage 3 universal checkpoint conversion for AutoEP requires the "
                                              "partition-native AutoEP ZeRO-3 checkpoint format"):
        build_index(tag)


def test_zero3_frozen_experts_are_refused(autoep_checkpoint, tmp_path):
    tag = copy_tag(autoep_checkpoint("mixtral_z3_fp32", **CASES["mixtral_z3_fp32"]), tmp_path / "checkpoint")
    _rewrite_zero3_model_states(tag, lambda state: state["frozen_param_shapes"].update({EXPERT: (2, 32, 64)}))
    with pytest.raises(CheckpointError, match=r"^AutoEP frozen expert parameters cannot be converted from the "
                                              r"ZeRO-3 partition-native format yet: \['model.layers.1.mlp.experts.w2'\]$"):
        build_index(tag)
