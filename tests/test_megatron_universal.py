"""Megatron-DeepSpeed-shaped checkpoints (TP x PP x DP) converted by ucpflow and by ds_to_universal: identical,
for every merge pattern of universal_checkpoint_info; DeepSpeed resumes from them on other layouts."""

import pytest
import torch
from conftest import convert, copy_tag, ds_to_universal, snakemake
from universal_compare import compare_universal, resume_from_ours

from ucpflow import ptfile
from ucpflow.demo.megatron.launch import resume_from_universal

LAYOUTS = {
    "t2p2d2": dict(tp=2, pp=2, dp=2),
    "t2p1d2": dict(tp=2, pp=1, dp=2),
    "t1p2d2": dict(tp=1, pp=2, dp=2),
    # the ZeRO-1 optimizer's file format instead of BF16_Optimizer's
    "t2p1d2_zero_optimizer": dict(tp=2, pp=1, dp=2, grad_accum_dtype="bf16"),
    "t2p2d1_swiglu_average": dict(tp=2, pp=2, dp=1, swiglu=True, partial_output_scale=True),
    # fused QKV as sub-parameters with uneven grouped-query widths per rank (SUB_PARAM_SHARD_WIDTHS)
    "t2p1d1_gqa_blocks": dict(tp=2, pp=1, dp=1, qkv_layout="blocks", heads=6, kv_heads=3, hidden=48),
}

# One parameter per merge class; each would come out wrong as a plain concatenation of TP slices.
CLASS_EXAMPLES = {
    "t2p2d2": ["2.input_layernorm.weight", "2.self_attention.dense.weight", "tied_modules.embed.word_embeddings.weight"],
    "t2p2d1_swiglu_average": ["2.mlp.dense_h_to_4h.weight", "2.mlp.partial_output_scale"],
    "t2p1d1_gqa_blocks": ["2.self_attention.query_key_value.weight"],
}


def build(megatron_checkpoint, case):
    return megatron_checkpoint(case, **LAYOUTS[case])


def both_conversions(tmp_path, tag, *flags, **config):
    source = copy_tag(tag, tmp_path / "checkpoint")
    ours = tmp_path / "ours" / f"{tag.name}_universal"
    convert(tmp_path / "run", source, ours, **config)
    theirs = ds_to_universal(source, tmp_path / "theirs" / f"{tag.name}_universal", *flags)
    return source, ours, theirs


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_matches_ds_to_universal(case, megatron_checkpoint, tmp_path):
    _, ours, theirs = both_conversions(tmp_path, build(megatron_checkpoint, case))
    assert compare_universal(ours, theirs, ours.parent / "latest_universal", theirs.parent / "latest_universal") == []


def naive_concatenation(tag, param, tp):
    """The parameter as a plain dim-0 concatenation of every layer file's slice (all TP ranks and stages)."""
    layer, key = ("01", param.split(".", 2)[2]) if param.startswith("tied_modules") else param.split(".", 1)
    layer = f"{int(layer):02d}"
    slices = []
    for path in sorted(tag.glob(f"layer_{layer}-model_*-model_states.pt")):
        slices.append(torch.load(path, weights_only=False)[key].float())
    if param.startswith("tied_modules"):
        for path in sorted(tag.glob("layer_*-model_*-model_states.pt")):
            state = torch.load(path, weights_only=False)
            if not path.name.startswith(f"layer_{layer}") and key in state:
                slices.append(state[key].float())
    return torch.cat(slices)


@pytest.mark.parametrize("case", sorted(CLASS_EXAMPLES))
def test_each_merge_class_differs_from_plain_concatenation(case, megatron_checkpoint, tmp_path):
    tag = build(megatron_checkpoint, case)
    source = copy_tag(tag, tmp_path / "checkpoint")
    ours = tmp_path / "ours" / "universal"
    convert(tmp_path / "run", source, ours)
    for param in CLASS_EXAMPLES[case]:
        merged = torch.load(ours / "zero" / param / "fp32.pt", weights_only=False)["param"]
        naive = naive_concatenation(tag, param, LAYOUTS[case]["tp"])
        same = naive.shape == merged.shape and torch.allclose(naive, merged, atol=1e-2)
        assert not same, f"{param}: a plain concatenation would give the same tensor"


RESUMES = {
    "t2p2d2": dict(tp=1, pp=2, dp=1),
    "t2p1d2": dict(tp=1, pp=1, dp=2),
}


@pytest.mark.parametrize("case", sorted(RESUMES))
def test_resume_on_other_layout(case, megatron_checkpoint, tmp_path):
    _, ours, theirs = both_conversions(tmp_path, build(megatron_checkpoint, case))
    options = {k: v for k, v in LAYOUTS[case].items() if k not in ("tp", "pp", "dp")}
    resume_from_ours(ours, theirs, lambda root: resume_from_universal(
        root, losses_out=tmp_path / "ours.json", steps=2, **RESUMES[case], **options))


def test_pattern_matching_nothing_fails_under_strict(megatron_checkpoint, tmp_path):
    tag = megatron_checkpoint("t2p1d1_unmatched", tp=2, pp=1, dp=1, unmatched_pattern=[r"\d+.no_such_parameter"])
    source = copy_tag(tag, tmp_path / "checkpoint")
    result = snakemake(tmp_path / "run", config={"input_folder": source, "output_folder": tmp_path / "out" / "u"})
    assert result.returncode != 0
    assert "ucpflow error:" in result.stderr and "no_such_parameter" in result.stderr and "strict" in result.stderr
    assert not (tmp_path / "out" / "latest_universal").exists()


def test_pattern_matching_nothing_converts_without_strict(megatron_checkpoint, tmp_path):
    tag = megatron_checkpoint("t2p1d1_unmatched", tp=2, pp=1, dp=1, unmatched_pattern=[r"\d+.no_such_parameter"])
    _, ours, theirs = both_conversions(tmp_path, tag, "--no_strict", strict="false")
    assert compare_universal(ours, theirs) == []


def change_fragment(rank_file, param):
    """Add 1 to `param`'s fp32 master weights in one rank file; True if the file holds a slice of it."""
    structure = ptfile.load(rank_file)
    optim = structure["optimizer_state_dict"]
    for group, mapping in enumerate(optim["param_slice_mappings"]):
        if param in mapping:
            flat = optim["single_partition_of_fp32_groups"][group]
            data = flat.read()
            data[mapping[param].start : mapping[param].start + mapping[param].numel] += 1.0
            optim["single_partition_of_fp32_groups"][group] = ptfile.ArrayTensor(data, flat.dtype, flat.shape)
            ptfile.save(structure, rank_file)
            return True
    return False


def test_replicated_parameter_with_differing_slices_is_an_error(megatron_checkpoint, tmp_path):
    source = copy_tag(build(megatron_checkpoint, "t2p1d2"), tmp_path / "checkpoint")
    param = "2.input_layernorm.weight"
    changed = [change_fragment(f, param) for f in sorted(source.glob("*_mp_rank_01_optim_states.pt"))]
    assert any(changed)
    result = snakemake(tmp_path / "run", config={"input_folder": source, "output_folder": tmp_path / "out" / "u"})
    assert result.returncode != 0
    assert f"Parameter {param} is declared tensor-parallel replicated" in result.stderr
    assert not (tmp_path / "out" / "latest_universal").exists()


def test_missing_layer_file_is_an_error(megatron_checkpoint, tmp_path):
    source = copy_tag(build(megatron_checkpoint, "t2p2d2"), tmp_path / "checkpoint")
    (source / "layer_03-model_01-model_states.pt").unlink()
    result = snakemake(tmp_path / "run", config={"input_folder": source, "output_folder": tmp_path / "out" / "u"})
    assert result.returncode != 0
    assert "layer_03-model_01-model_states.pt is missing" in result.stderr
