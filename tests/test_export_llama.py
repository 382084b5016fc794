"""Llama-family Megatron-DeepSpeed checkpoints (RMSNorm, rotary, untied output layer, no biases, SwiGLU, GQA) at
TP 2 x PP 2 x DP 2, in both fused-QKV layouts: the universal conversion equals ds_to_universal's, `hf` writes a
LlamaForCausalLM whose logits are the trained model's, `megatron` re-assembles to the universal weights at other
degrees, and a wrongly chosen layout gives other logits."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ds_to_universal, snakemake
from export_cases import LLAMA_PER_GROUP, LLAMA_PER_SLICE, model_options, universal_checkpoint
from test_export_hf import load_with_captured_logs
from test_export_megatron import DTYPES, load_ranks
from universal_compare import compare_universal

from ucpflow.demo.megatron.config import GPTConfig
from ucpflow.errors import UcpflowError
from ucpflow.export import qkv_layout
from ucpflow.export import tensors as T

TOKENS = [[1, 2, 3, 4, 5, 6, 7, 8], [49, 0, 17, 17, 3, 44, 2, 30]]
LAYOUT_OF_CASE = {LLAMA_PER_GROUP[0]: qkv_layout.PER_GROUP, LLAMA_PER_SLICE[0]: qkv_layout.PER_SLICE}
OTHER_LAYOUT = {qkv_layout.PER_GROUP: qkv_layout.PER_SLICE, qkv_layout.PER_SLICE: qkv_layout.PER_GROUP}


@pytest.fixture(scope="module", params=[LLAMA_PER_GROUP, LLAMA_PER_SLICE], ids=lambda case: case[0])
def llama(request, megatron_checkpoint, tmp_path_factory):
    case = request.param
    converted = universal_checkpoint(megatron_checkpoint, case, tmp_path_factory.mktemp(case[0]))
    return case, converted


def toy_logits(case, converted, bf16_weights):
    """The trained model's logits (TP 1, the universal fp32 weights, or them rounded to bf16), from the fixture's
    own forward pass."""
    output = converted.workdir / f"reference_logits_{bf16_weights}.pt"
    slices = ["--qkv-slices", str(case[1]["tp"])] if case[1]["qkv_layout"] == "blocks" else []
    command = [sys.executable, str(Path(__file__).with_name("toy_gpt_logits.py")), str(converted.universal),
               json.dumps(model_options(case)), json.dumps(TOKENS), str(output), *slices,
               *(["--bf16-weights"] if bf16_weights else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


@pytest.fixture(scope="module")
def reference_logits(llama):
    return toy_logits(*llama, bf16_weights=False)


def hf_export(converted, folder, **config):
    result = converted.export("hf", hf_folder=folder, **config)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def test_universal_is_identical_to_ds_to_universal(llama, tmp_path):
    _, converted = llama
    theirs = ds_to_universal(converted.tag, tmp_path / "theirs")
    assert compare_universal(converted.universal, theirs) == []


def test_hf_llama_loads_cleanly_and_matches_the_trained_models_logits(llama, reference_logits):
    case, converted = llama
    folder = hf_export(converted, converted.workdir / "hf")
    model, info, warnings = load_with_captured_logs(folder)
    assert warnings == "" and not any(info.values()), info
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.bfloat16
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 4)
    assert (config.vocab_size, config.intermediate_size, config.num_hidden_layers) == (50, 64, 2)
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 10000.0
    assert not config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight
    assert not config.attention_bias and not config.mlp_bias

    fp32_model, _, _ = load_with_captured_logs(folder, dtype=torch.float32)
    with torch.no_grad():
        bf16_logits = model(torch.tensor(TOKENS)).logits.float()
        fp32_logits = fp32_model(torch.tensor(TOKENS)).logits
    # The exported bf16 weights computed in fp32: the model with its weights rounded to bf16, up to fp32 rounding.
    torch.testing.assert_close(fp32_logits, toy_logits(case, converted, bf16_weights=True), rtol=1e-5, atol=1e-5)
    # The bf16 model against the checkpoint's own fp32 weights: within bf16 precision.
    torch.testing.assert_close(bf16_logits, reference_logits, rtol=0, atol=2e-2)


def test_a_wrongly_chosen_qkv_layout_gives_other_logits(llama, reference_logits):
    case, converted = llama
    wrong = OTHER_LAYOUT[LAYOUT_OF_CASE[case[0]]]
    folder = hf_export(converted, converted.workdir / "hf_wrong", megatron_qkv_layout=wrong)
    model, _, _ = load_with_captured_logs(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits
    assert (logits - reference_logits).abs().max() > 1e-2


def reassemble_qkv(pieces, layout, heads, kv_heads, head_dim):
    """[Q; K; V] rows from the target ranks' pieces, read back with the toy model's definition of each layout."""
    tp = len(pieces)
    options = dict(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, ffn_hidden=tp * 8, tp=tp)
    full = torch.empty(sum(piece.shape[0] for piece in pieces), *pieces[0].shape[1:], dtype=pieces[0].dtype)
    config = GPTConfig(qkv_layout="interleaved" if layout == qkv_layout.PER_GROUP else "blocks", **options)
    for rank, piece in enumerate(pieces):
        full[config.qkv_rows(rank)] = piece
    if layout == qkv_layout.PER_GROUP:  # the toy model's interleaved full tensor is per-group: make it [Q; K; V]
        full = torch.from_numpy(T.qkv_per_group_to_blocks(full.float().numpy(), heads, kv_heads, head_dim)).to(
            full.dtype)
    return full


def universal_qkv_blocks(universal_qkv, case):
    """The universal fused QKV as [Q; K; V], by the toy model's own row definitions at the source degree."""
    options = model_options(case)
    source = GPTConfig(tp=case[1]["tp"], **options)
    full = torch.empty_like(universal_qkv)
    full[torch.tensor([row for rank in range(source.tp) for row in source.qkv_rows(rank)])] = universal_qkv
    if options["qkv_layout"] == "interleaved":
        full = torch.from_numpy(T.qkv_per_group_to_blocks(full.numpy(), 8, 4, 4))
    return full


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2), (4, 1)])
def test_megatron_at_other_degrees_reassembles_to_the_universal_weights(llama, tmp_path, tp, pp):
    case, converted = llama
    folder = tmp_path / "megatron"
    result = converted.export("megatron", target_tp=tp, target_pp=pp, megatron_folder=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    iteration, ranks = load_ranks(folder, tp, pp)
    layers, dtype = case[1]["layers"], DTYPES["bf16"]
    padded_vocab = GPTConfig(tp=tp, **model_options(case)).padded_vocab
    universal = {path.name: torch.load(path / "fp32.pt", weights_only=False)["param"].to(dtype)
                 for path in (converted.universal / "zero").iterdir() if path.is_dir()}
    seen = set()

    def check(name, full):
        seen.add(name)
        expected = universal[name]
        if name.endswith(("word_embeddings.weight", "lm_head.weight")):
            assert full.shape[0] == padded_vocab and not full[expected.shape[0]:].any()
            full = full[:expected.shape[0]]
        assert full.dtype == dtype and torch.equal(full, expected), name

    for (t, p), saved in ranks.items():
        args = saved["args"]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
        assert args.padded_vocab_size == padded_vocab and saved["checkpoint_version"] == 3.0
        language_model = saved["model"]["language_model"]
        assert set(language_model) == {"encoder"} | ({"embedding"} if p == 0 else set()) | (
            {"output_layer"} if p == pp - 1 else set())
        assert "word_embeddings_for_head" not in saved["model"]
        if p == 0:
            assert set(language_model["embedding"]) == {"word_embeddings"}
    for stage in range(pp):
        encoders = [ranks[(t, stage)]["model"]["language_model"]["encoder"] for t in range(tp)]
        for key in encoders[0]:
            pieces = [encoder[key] for encoder in encoders]
            local, _, name = key.removeprefix("layers.").partition(".")
            if key.startswith("final_layernorm."):
                assert all(torch.equal(piece, pieces[0]) for piece in pieces)
                check(f"{2 + layers + 1 - 1}.{key.removeprefix('final_layernorm.')}", pieces[0])
                continue
            param = f"{2 + stage * (layers // pp) + int(local)}.{name}"
            if "query_key_value" in name:
                full = reassemble_qkv(pieces, LAYOUT_OF_CASE[case[0]], 8, 4, 4)
                seen.add(param)
                assert torch.equal(full, universal_qkv_blocks(universal[param].float(), case).to(dtype)), param
            elif name.endswith("dense_h_to_4h.weight"):
                halves = [piece.chunk(2) for piece in pieces]
                check(param, torch.cat([g for g, _ in halves] + [u for _, u in halves]))
            elif name.endswith(("dense_4h_to_h.weight", "self_attention.dense.weight")):
                check(param, torch.cat(pieces, dim=1))
            else:
                assert all(torch.equal(piece, pieces[0]) for piece in pieces), key
                check(param, pieces[0])
    check("1.word_embeddings.weight", torch.cat(
        [ranks[(t, 0)]["model"]["language_model"]["embedding"]["word_embeddings"]["weight"] for t in range(tp)]))
    check(f"{layers + 3}.lm_head.weight", torch.cat(
        [ranks[(t, pp - 1)]["model"]["language_model"]["output_layer"]["weight"] for t in range(tp)]))
    assert seen == set(universal)
    assert iteration == case[1]["steps"]


def test_inspect_names_the_family_the_layout_and_what_each_export_does(llama, tmp_path):
    case, converted = llama
    result = snakemake(converted.workdir, "inspect", config={
        "input_folder": converted.tag, "output_folder": converted.universal, "inspect_folder": tmp_path / "inspect"},
        check=True)
    layout = LAYOUT_OF_CASE[case[0]]
    assert "Model family: Llama (8 heads, 4 key/value heads, SwiGLU, RMSNorm, rotary positions" in result.stdout
    assert f"Fused QKV layout: {layout} (the args have ds_sequence_parallel_" in result.stdout
    assert "hf: LlamaForCausalLM" in result.stdout and "megatron: any target_tp dividing 4" in result.stdout


def test_the_layout_is_told_from_the_args_or_the_export_says_it_cannot():
    after = argparse.Namespace(num_key_value_heads=4, ds_sequence_parallel_size=1, ds_sequence_parallel_fpdt=False)
    before = argparse.Namespace(num_key_value_heads=4, ds_sequence_parallel_size=1)
    unknown = argparse.Namespace(num_key_value_heads=4)
    assert qkv_layout.resolve(after, "auto", 4, 2)[0] == qkv_layout.PER_SLICE
    assert qkv_layout.resolve(before, "auto", 4, 2)[0] == qkv_layout.PER_GROUP
    assert qkv_layout.resolve(argparse.Namespace(), "auto", 4, 2)[0] == qkv_layout.PER_GROUP  # before GQA existed
    assert qkv_layout.resolve(unknown, "auto", 4, 4)[0] == qkv_layout.PER_GROUP  # one group per rank: the same rows
    assert qkv_layout.resolve(unknown, "auto", 4, 2, sub_params=True)[0] == qkv_layout.PER_SLICE
    assert qkv_layout.resolve(unknown, "per_slice", 4, 2)[0] == qkv_layout.PER_SLICE
    with pytest.raises(UcpflowError, match=r"The fused QKV layout cannot be told: .* set config key "
                                           r"`megatron_qkv_layout` to per_group \(before PR #441\) or per_slice"):
        qkv_layout.resolve(unknown, "auto", 4, 2)
    assert qkv_layout.describe(unknown, 4, 2).startswith("cannot be told (the args record neither")


@pytest.mark.parametrize("slices", [1, 2, 4])
def test_per_slice_rows_are_the_toy_models_blocks_ranks(slices):
    heads, kv_heads, head_dim = 8, 4, 2
    blocks = np.arange((heads + 2 * kv_heads) * head_dim * 3, dtype=np.float32).reshape(-1, 3)
    config = GPTConfig(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, ffn_hidden=8, qkv_layout="blocks",
                       tp=slices)
    per_slice = T.qkv_blocks_to_per_slice(blocks, heads, kv_heads, head_dim, slices)
    assert np.array_equal(per_slice, np.concatenate([blocks[config.qkv_rows(rank)] for rank in range(slices)]))
    assert np.array_equal(T.qkv_per_slice_to_blocks(per_slice, heads, kv_heads, head_dim, slices), blocks)
