"""`snakemake hf`: a transformers GPT-2 folder that loads without missing or unexpected weights and computes
the logits of the toy Megatron GPT that DeepSpeed trained, from the same checkpoint."""

import io
import json
import math
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from export_cases import BLOCKS_GQA_SWIGLU_TP2, PER_HEAD_TP2_PP2, model_options, universal_checkpoint
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open

from ucpflow.errors import UcpflowError
from ucpflow.export.hf_common import (
    TRANSFORMERS_SOURCE,
    parse_size,
    save_order,
    shard_memory_mb,
    shard_runtime_minutes,
    split_into_shards,
)

TOKENS = [[1, 2, 3, 4, 5, 6, 7, 8], [49, 0, 17, 17, 3, 44, 2, 30]]
MAX_SHARD_SIZE = "40KB"  # the toy model's 104 kB of bf16 weights in three files


@pytest.fixture(scope="module")
def per_head_source(megatron_checkpoint, tmp_path_factory):
    return universal_checkpoint(megatron_checkpoint, PER_HEAD_TP2_PP2, tmp_path_factory.mktemp("hf_per_head"))


@pytest.fixture(scope="module")
def hf_folder(per_head_source):
    folder = per_head_source.workdir / "hf"
    result = per_head_source.export("hf", hf_folder=folder, hf_max_shard_size=MAX_SHARD_SIZE)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def load_with_captured_logs(folder, **options):
    """from_pretrained, with the transformers warnings it logs and its loading info."""
    from transformers import AutoModelForCausalLM

    captured = io.StringIO()
    handler = logging.StreamHandler(captured)
    handler.setLevel(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **options)
    finally:
        logger.removeHandler(handler)
    return model.eval(), info, captured.getvalue()


def toy_logits(universal, case, tmp_path, bf16_weights):
    output = tmp_path / f"toy_logits_{bf16_weights}.pt"
    command = [sys.executable, str(Path(__file__).with_name("toy_gpt_logits.py")), str(universal),
               json.dumps(model_options(case)), json.dumps(TOKENS), str(output)]
    result = subprocess.run(command + (["--bf16-weights"] if bf16_weights else []), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(output)


def test_transformers_loads_it_without_weight_warnings_and_matches_the_toy_models_logits(
        hf_folder, per_head_source, tmp_path):
    model, info, warnings = load_with_captured_logs(hf_folder)
    assert warnings == ""
    assert not any(info.values()), info
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight

    with torch.no_grad():
        bf16_logits = model(torch.tensor(TOKENS)).logits.float()
        fp32_model, _, _ = load_with_captured_logs(hf_folder, dtype=torch.float32)
        fp32_logits = fp32_model(torch.tensor(TOKENS)).logits

    # The same bf16-rounded weights computed in fp32: the architectures agree to rounding.
    reference = toy_logits(per_head_source.universal, PER_HEAD_TP2_PP2, tmp_path, bf16_weights=True)
    assert fp32_logits.shape == reference.shape == (2, 8, 50)
    torch.testing.assert_close(fp32_logits, reference, rtol=1e-5, atol=1e-5)
    # The checkpoint's own fp32 weights against the bf16 model: within bf16 precision.
    reference_fp32 = toy_logits(per_head_source.universal, PER_HEAD_TP2_PP2, tmp_path, bf16_weights=False)
    torch.testing.assert_close(bf16_logits, reference_fp32, rtol=0, atol=2e-2)


def test_files_are_those_save_pretrained_writes(hf_folder, tmp_path):
    model, _, _ = load_with_captured_logs(hf_folder)
    reference = tmp_path / "save_pretrained"
    model.save_pretrained(reference, max_shard_size=MAX_SHARD_SIZE)

    ours = sorted(path.name for path in hf_folder.iterdir())
    assert ours == sorted(path.name for path in reference.iterdir())
    assert "model-00003-of-00003.safetensors" in ours
    assert json.loads((hf_folder / "model.safetensors.index.json").read_text()) == json.loads(
        (reference / "model.safetensors.index.json").read_text())
    config, reference_config = (json.loads((folder / "config.json").read_text()) for folder in (hf_folder, reference))
    reference_config.pop("transformers_version")
    assert config == reference_config
    assert config["activation_function"] == "gelu_pytorch_tanh" and config["vocab_size"] == 50
    for name in ours:
        if name.endswith(".safetensors"):
            with safe_open(hf_folder / name, "pt") as mine, safe_open(reference / name, "pt") as theirs:
                assert mine.metadata() == {"format": "pt"}
                assert list(mine.keys()) == list(theirs.keys())
                for key in mine.keys():
                    assert torch.equal(mine.get_tensor(key), theirs.get_tensor(key)), key


def test_a_model_gpt2_cannot_hold_fails_in_one_sentence(megatron_checkpoint, tmp_path):
    converted = universal_checkpoint(megatron_checkpoint, BLOCKS_GQA_SWIGLU_TP2, tmp_path)
    result = converted.export("hf", hf_folder=tmp_path / "hf")
    assert result.returncode != 0
    assert ("ucpflow error: The model has a gated (SwiGLU) or squared-ReLU MLP, which a transformers GPT-2 model "
            "cannot hold, and layernorm norms, which a Llama model cannot; the hf export supports GPT-2 and "
            "Llama-family Megatron models only.") in result.stderr
    assert not (tmp_path / "hf").exists()


def test_shards_split_as_huggingface_hub_splits():
    sizes = [30, 50, 20, 120, 10, 60, 40, 40, 5]  # bytes of uint8 tensors, one larger than the limit
    state_dict = {f"t{i}": torch.zeros(size, dtype=torch.uint8) for i, size in enumerate(sizes)}
    split = split_torch_state_dict_into_shards(state_dict, max_shard_size=100)

    ours = split_into_shards({name: tensor.numel() for name, tensor in state_dict.items()}, 100)

    assert ours == list(split.filename_to_tensors.values())
    assert ours[0] == ["t3"]


def test_shard_sizes_are_read_as_transformers_reads_them():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size(" 1.5 mb") == 1_500_000
    assert parse_size(1234) == 1234
    with pytest.raises(UcpflowError, match="hf_max_shard_size"):
        parse_size("5GiB")


def test_tensors_are_ordered_as_transformers_orders_them_for_saving():
    from transformers.core_model_loading import dot_natural_key

    names = [f"transformer.h.{layer}.{name}" for layer in (0, 2, 10, 11) for name in
             ("ln_1.weight", "ln_2.bias", "attn.c_attn.weight", "mlp.c_proj.bias")]
    names += ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]

    assert sorted(names, key=save_order) == sorted(names, key=dot_natural_key)


@pytest.mark.parametrize("source, held_mib", [(TRANSFORMERS_SOURCE, 4 * 4 * 64), ("megatron", 4 * 4 * 64 + 2 * (64 + 16))])
def test_shard_jobs_ask_slurm_for_the_memory_and_time_their_tensors_need(source, held_mib):
    """A transformers model's shard job streams one tensor at a time; a Megatron model's holds its file's
    tensors (bf16 here) until it writes them. Time: the fp32 bytes at 50 MB/s, plus 10 minutes."""
    mib = 2**20
    plan = {"source": source, "dtype": "bf16", "shards": {"model-00001-of-00002": ["big", "small"], "model-00002-of-00002": []},
            "tensors": {"big": {"shape": [64, mib]}, "small": {"shape": [16, mib // 1024, 1024]}}}
    assert shard_memory_mb(plan, "model-00001-of-00002") == 512 + held_mib
    assert shard_memory_mb(plan, "model-00002-of-00002") == 512
    assert shard_runtime_minutes(plan, "model-00001-of-00002") == 10 + math.ceil(4 * 80 * mib / 50e6 / 60)
