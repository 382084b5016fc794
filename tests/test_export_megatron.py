"""`snakemake megatron`: Megatron-LM checkpoints at smaller, equal and larger degrees than the source's.

The full tensors re-assembled from every rank's model_optim_rng.pt must equal the universal fp32 weights
cast to the training dtype, with Megatron's fused-QKV order and the vocabulary padded for the target degree.
"""

import re

import numpy as np
import pytest
import torch
from export_cases import BLOCKS_GQA_SWIGLU_TP2, PER_HEAD_TP2_PP2, model_options, universal_checkpoint

from ucpflow.demo.megatron.config import GPTConfig
from ucpflow import ptfile
from ucpflow.errors import UcpflowError
from ucpflow.export import tensors as T
from ucpflow.export.source import FINAL_NORM, LAYER, WORD_EMBEDDINGS, classify_parameters

COLUMN_PARALLEL = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
ROW_PARALLEL_WEIGHTS = ("self_attention.dense.weight", "mlp.dense_4h_to_h.weight")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.fixture(scope="module")
def per_head_source(megatron_checkpoint, tmp_path_factory):
    return universal_checkpoint(megatron_checkpoint, PER_HEAD_TP2_PP2, tmp_path_factory.mktemp("per_head"))


@pytest.fixture(scope="module")
def blocks_source(megatron_checkpoint, tmp_path_factory):
    return universal_checkpoint(megatron_checkpoint, BLOCKS_GQA_SWIGLU_TP2, tmp_path_factory.mktemp("blocks"))


def rank_name(tp_rank, pp_rank, pp):
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def load_ranks(folder, tp, pp):
    iteration = int((folder / "latest_checkpointed_iteration.txt").read_text())
    return iteration, {(t, p): torch.load(folder / f"iter_{iteration:07d}" / rank_name(t, p, pp) / "model_optim_rng.pt",
                                          weights_only=False)
                       for t in range(tp) for p in range(pp)}


def merge_pieces(name, pieces, swiglu):
    """Megatron's own tensor-parallel layout, read backwards."""
    if name.endswith(ROW_PARALLEL_WEIGHTS):
        return torch.cat(pieces, dim=1)
    if name.startswith("mlp.dense_h_to_4h") and swiglu:
        halves = [piece.chunk(2) for piece in pieces]
        return torch.cat([gate for gate, _ in halves] + [up for _, up in halves])
    if name.startswith(COLUMN_PARALLEL):
        return torch.cat(pieces)
    for piece in pieces[1:]:
        assert torch.equal(piece, pieces[0]), f"{name} differs between tensor-parallel ranks"
    return pieces[0]


def reassemble(ranks, tp, pp, layers, swiglu):
    """{universal parameter name: full tensor} from every rank's file (GPTModelPipe names)."""
    full = {}
    per_stage = layers // pp
    for stage in range(pp):
        encoders = [ranks[(t, stage)]["model"]["language_model"]["encoder"] for t in range(tp)]
        for key in encoders[0]:
            if match := re.fullmatch(r"layers\.(\d+)\.(.+)", key):
                layer, name = stage * per_stage + int(match.group(1)), match.group(2)
                full[f"{2 + layer}.{name}"] = merge_pieces(name, [e[key] for e in encoders], swiglu)
            else:
                name = key.removeprefix("final_layernorm.")
                full[f"{2 + layers}.{name}"] = merge_pieces(name, [e[key] for e in encoders], swiglu)
    embeddings = [ranks[(t, 0)]["model"]["language_model"]["embedding"] for t in range(tp)]
    full["tied_modules.embed.word_embeddings.weight"] = torch.cat([e["word_embeddings"]["weight"] for e in embeddings])
    full["tied_modules.embed.position_embeddings.weight"] = merge_pieces(
        "position_embeddings", [e["position_embeddings"]["weight"] for e in embeddings], swiglu)
    if pp > 1:
        head = torch.cat([ranks[(t, pp - 1)]["model"]["word_embeddings_for_head"]["weight"] for t in range(tp)])
        assert torch.equal(head, full["tied_modules.embed.word_embeddings.weight"])
    return full


def expected_qkv(universal_qkv, options, tp):
    """The target ranks' QKV rows, concatenated, from [Q; K; V] sub-parameters: a model whose universal info
    describes [Q; K; V] sub-parameters holds [Q; K; V] of its groups on each rank (the toy model's "blocks")."""
    if options.get("qkv_layout") != "blocks":
        return universal_qkv
    config = GPTConfig(**options, tp=tp)
    return torch.cat([universal_qkv[config.qkv_rows(rank)] for rank in range(tp)])


def check_megatron_export(folder, universal, case, tp, pp):
    options, spec = model_options(case), case[1]
    iteration, ranks = load_ranks(folder, tp, pp)
    assert iteration == spec["steps"]

    # file layout
    expected_files = {"latest_checkpointed_iteration.txt"} | {
        f"iter_{iteration:07d}/{rank_name(t, p, pp)}/model_optim_rng.pt" for t in range(tp) for p in range(pp)}
    assert {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()} == expected_files
    padded_vocab = GPTConfig(**options, tp=tp).padded_vocab
    for (t, p), saved in ranks.items():
        assert set(saved) == {"model", "checkpoint_version", "iteration", "args"}
        assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == iteration
        args = saved["args"]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
        assert args.padded_vocab_size == padded_vocab and args.num_layers == spec["layers"]
        model = saved["model"]
        assert set(model) == {"language_model"} | ({"word_embeddings_for_head"} if pp > 1 and p == pp - 1 else set())
        assert set(model["language_model"]) == {"encoder"} | ({"embedding"} if p == 0 else set())
        has_final_norm = any(key.startswith("final_layernorm.") for key in model["language_model"]["encoder"])
        assert has_final_norm == (p == pp - 1)

    # contents
    dtype = DTYPES[spec.get("dtype", "bf16")]
    full = reassemble(ranks, tp, pp, spec["layers"], spec.get("swiglu", False))
    names = sorted(path.name for path in (universal / "zero").iterdir() if path.is_dir())
    assert sorted(full) == names
    for name in names:
        weight = torch.load(universal / "zero" / name / "fp32.pt", weights_only=False)["param"]
        if "query_key_value" in name:
            weight = expected_qkv(weight, options, tp)
        if name.endswith("word_embeddings.weight"):
            assert full[name].shape[0] == padded_vocab
            assert not full[name][weight.shape[0]:].any(), "vocabulary padding must be zeros"
            full[name] = full[name][:weight.shape[0]]
        assert full[name].dtype == dtype, name
        assert torch.equal(full[name], weight.to(dtype)), name


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 2), (4, 4)], ids=["smaller", "equal", "larger"])
def test_per_head_qkv_checkpoint_at_other_degrees(per_head_source, tmp_path, tp, pp):
    folder = tmp_path / "megatron"
    result = per_head_source.export("megatron", target_tp=tp, target_pp=pp, megatron_folder=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    check_megatron_export(folder, per_head_source.universal, PER_HEAD_TP2_PP2, tp, pp)


@pytest.mark.parametrize("tp, pp", [(1, 2), (4, 1)], ids=["smaller", "larger"])
def test_qkv_sub_params_gqa_swiglu_checkpoint_at_other_degrees(blocks_source, tmp_path, tp, pp):
    folder = tmp_path / "megatron"
    result = blocks_source.export("megatron", target_tp=tp, target_pp=pp, megatron_folder=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    check_megatron_export(folder, blocks_source.universal, BLOCKS_GQA_SWIGLU_TP2, tp, pp)


def test_impossible_degrees_and_a_folder_of_another_layout_fail_in_one_sentence(per_head_source, tmp_path):
    folder = tmp_path / "megatron"

    uneven = per_head_source.export("megatron", target_pp=3, megatron_folder=folder)
    assert uneven.returncode != 0
    assert ("ucpflow error: Config key `target_pp`: 4 layers cannot be spread evenly over 3 pipeline stages."
            in uneven.stderr)

    (folder / "iter_0000002" / "mp_rank_00").mkdir(parents=True)
    stale = per_head_source.export("megatron", target_tp=2, target_pp=2, megatron_folder=folder)
    assert stale.returncode != 0
    assert "already holds mp_rank_00, which is not part of a tp 2 pp 2 checkpoint" in stale.stderr
    assert not (folder / "latest_checkpointed_iteration.txt").exists()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2), (6, 3)])
def test_qkv_reorder_matches_the_toy_models_two_layouts(heads, kv_heads):
    head_dim = 2
    options = dict(hidden=heads * head_dim, heads=heads, kv_heads=kv_heads, ffn_hidden=kv_heads * 4)
    rows = (heads + 2 * kv_heads) * head_dim
    blocks = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3)
    blocks_config = GPTConfig(**options, qkv_layout="blocks", tp=kv_heads)

    per_group = T.qkv_blocks_to_per_group(blocks, heads, kv_heads, head_dim)

    assert np.array_equal(per_group, np.concatenate([blocks[blocks_config.qkv_rows(r)] for r in range(kv_heads)]))
    assert np.array_equal(T.qkv_per_group_to_blocks(per_group, heads, kv_heads, head_dim), blocks)
    assert np.array_equal(T.qkv_blocks_to_per_group(blocks[:, 0], heads, kv_heads, head_dim), per_group[:, 0])


def test_vocabulary_padding_and_pieces():
    for tp in (1, 2, 4):
        assert T.padded_vocab_size(50, 8, tp) == GPTConfig(vocab=50, heads=4, tp=tp).padded_vocab
    assert T.padded_vocab_size(100, 8, 3) == 120
    full = np.arange(24, dtype=np.float32).reshape(4, 6)
    assert np.array_equal(T.tensor_parallel_piece(full, T.ROW, 1, 2), full[:, 3:])
    assert np.array_equal(T.tensor_parallel_piece(full, T.GATE_UP, 1, 2), full[[1, 3]])
    with pytest.raises(ValueError, match="not divisible"):
        T.tensor_parallel_piece(full, T.COLUMN, 0, 3)


def test_parameter_names_of_gpt_model_pipe_and_gpt_model():
    pipe = classify_parameters(["tied_modules.embed.word_embeddings.weight", "3.mlp.dense_4h_to_h.weight",
                                "2.input_layernorm.bias", "4.weight", "4.bias"])
    assert pipe["3.mlp.dense_4h_to_h.weight"] == (LAYER, 1, "mlp.dense_4h_to_h.weight")
    assert pipe["2.input_layernorm.bias"] == (LAYER, 0, "input_layernorm.bias")
    assert pipe["4.weight"] == (FINAL_NORM, -1, "weight")
    assert pipe["tied_modules.embed.word_embeddings.weight"] == (WORD_EMBEDDINGS, -1, "weight")

    plain = classify_parameters(["language_model.embedding.word_embeddings.weight",
                                 "language_model.encoder.layers.0.self_attention.dense.bias",
                                 "language_model.encoder.final_layernorm.weight"])
    assert plain["language_model.encoder.layers.0.self_attention.dense.bias"] == (LAYER, 0, "self_attention.dense.bias")
    assert plain["language_model.encoder.final_layernorm.weight"] == (FINAL_NORM, -1, "weight")

    with pytest.raises(UcpflowError, match="blocks.0.attn.qkv.weight is not part of a Megatron GPT model"):
        classify_parameters(["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_weights_are_cast_as_torch_casts_them(dtype, tmp_path):
    values = np.array([1.0, 1 + 2**-9, 1 + 3 * 2**-9, -3.14159, 1e-30, 70000.0, np.nan], dtype=np.float32)
    ptfile.save({"w": T.saved_tensor(values, dtype)}, tmp_path / "w.pt")

    saved = torch.load(tmp_path / "w.pt", weights_only=True)["w"]

    expected = torch.from_numpy(values).to(DTYPES[dtype])
    assert saved.dtype == expected.dtype
    assert torch.equal(saved.nan_to_num(), expected.nan_to_num()) and saved.isnan().tolist() == expected.isnan().tolist()
