"""`snakemake hf` on checkpoints of transformers models trained with DeepSpeed (the HF Trainer's folder layout,
DP-only ZeRO-1/3 and AutoTP): the tensors are zero_to_fp32's, transformers loads the folder without warnings,
its files are those save_pretrained writes, and its logits are those of the model built from zero_to_fp32's
state dict."""

import json

import pytest
import torch
from conftest import snakemake
from safetensors import safe_open
from test_autotp_universal import CASES as AUTOTP_CASES
from test_export_hf import load_with_captured_logs

TOKENS = [[1, 5, 9, 3, 7, 2, 11, 4], [0, 17, 17, 3, 44, 2, 30, 8]]
LLAMA = dict(model="llama", zero_stage=3, dtype="bf16", freeze=["model.embed_tokens.weight"])
GPT2 = dict(model="gpt2", zero_stage=1, dtype="fp32", tokenizer=True)
AUTOTP = "llama_z1_bf16"  # test_autotp_universal's checkpoint, built once per session
NOTICE = "gets the default (data-parallel only), as with inject_missing_state."


def export(tag, workdir, hf_folder, **config):
    universal = workdir / "universal" / f"{tag.name}_universal"
    result = snakemake(workdir, "hf", config={"input_folder": tag, "output_folder": universal,
                                              "hf_folder": hf_folder, **config})
    assert result.returncode == 0, result.stderr[-3000:]
    return result, universal


def safetensors_state(folder):
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            state.update({key: handle.get_tensor(key) for key in handle.keys()})
    return state


def zero_to_fp32(tag):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)


def reference_logits(folder, state_dict):
    """Logits of the model of folder/config.json in fp32 with `state_dict`'s weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    with torch.no_grad():
        return model.eval()(torch.tensor(TOKENS)).logits


def check_loads_and_matches(folder, reference_state, max_shard_size=None, tmp_path=None):
    """from_pretrained without warnings; logits equal the reference's; files as save_pretrained writes them."""
    model, info, warnings = load_with_captured_logs(folder, dtype=torch.float32)
    assert warnings == "" and not any(info.values()), (warnings, info)
    with torch.no_grad():
        logits = model(torch.tensor(TOKENS)).logits
    assert torch.equal(logits, reference_logits(folder, reference_state))
    if tmp_path is not None:
        reference = tmp_path / "save_pretrained"
        model.save_pretrained(reference, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        assert sorted(p.name for p in folder.glob("model*")) == sorted(p.name for p in reference.glob("model*"))
        index = "model.safetensors.index.json"
        if (reference / index).exists():
            assert json.loads((folder / index).read_text()) == json.loads((reference / index).read_text())
    return model


@pytest.fixture(scope="module")
def llama(trainer_checkpoint, tmp_path_factory):
    tag = trainer_checkpoint("llama_z3_bf16_frozen", **LLAMA)
    workdir = tmp_path_factory.mktemp("hf_llama")
    result, universal = export(tag, workdir, workdir / "hf", hf_max_shard_size="60KB")
    return tag, workdir, universal, result


def test_llama_gqa_zero3_bf16_with_a_frozen_parameter(llama, tmp_path):
    tag, workdir, _, _ = llama
    folder = workdir / "hf"
    ours, theirs = safetensors_state(folder), zero_to_fp32(tag)
    assert "model.embed_tokens.weight" in ours and "lm_head.weight" in ours  # frozen, and an untied head
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, theirs[name].float()), name
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2
    config = json.loads((folder / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["dtype"] == "float32"
    assert (folder / "generation_config.json").read_text() == (tag.parent / "generation_config.json").read_text()
    model = check_loads_and_matches(folder, theirs, "60KB", tmp_path)
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_the_export_merges_the_rank_files_without_writing_a_universal_checkpoint(llama):
    tag, workdir, universal, _ = llama
    assert not universal.exists()  # no zero/<param>/fp32.pt, optimizer state or model-states copy
    logs = next((workdir / "ucpflow-work").glob("*/logs"))
    kinds = {p.name for p in logs.rglob("*") if p.is_dir()}
    assert {"export", "extract"} <= kinds and not {"merge", "publish"} & kinds  # no merge, no publish
    plan = json.loads(next((workdir / "ucpflow-work").glob("*/*/export/hf_plan.json")).read_text())
    assert {spec["kind"] for spec in plan["tensors"].values()} == {"merged", "fragments"}  # fragments: the frozen one


def test_another_save_of_the_same_model_is_planned_from_the_cached_description(llama, tmp_path):
    """The plan of a second export with the same config.json and dtype (every further save of a training run)
    reads the model's description from the cache instead of importing transformers; the files are the same."""
    tag, workdir, _, _ = llama
    folder = tmp_path / "hf"
    export(tag, tmp_path, folder, hf_max_shard_size="60KB")
    [plan_log] = (tmp_path / "ucpflow-work").glob("*/logs/*/export/hf_plan.log")
    assert "(cached description)" in plan_log.read_text()
    first = workdir / "hf"
    written = sorted(p.name for p in folder.iterdir())
    assert written == sorted(p.name for p in first.iterdir())
    assert all((folder / name).read_bytes() == (first / name).read_bytes() for name in written)


def test_exclude_frozen_and_the_training_dtype(llama):
    tag, workdir, universal, _ = llama
    folder = workdir / "hf_auto"
    export(tag, workdir, folder, hf_dtype="auto", hf_exclude_frozen=True)
    ours = safetensors_state(folder)
    theirs = zero_to_fp32(tag)
    assert sorted(ours) == sorted(set(theirs) - {"model.embed_tokens.weight"})
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, theirs[name].to(torch.bfloat16)), name
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_gpt2_zero1_tied_embeddings_tokenizer_and_no_universal_info(trainer_checkpoint, tmp_path):
    tag = trainer_checkpoint("gpt2_z1_fp32", **GPT2)
    result, _ = export(tag, tmp_path, tmp_path / "hf")
    assert NOTICE in result.stderr  # converted without inject_missing_state
    folder = tmp_path / "hf"
    ours, theirs = safetensors_state(folder), zero_to_fp32(tag)
    assert sorted(ours) == sorted(set(theirs) - {"lm_head.weight"})  # the tied head is stored once
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (tag.parent / name).read_bytes()
    model = check_loads_and_matches(folder, theirs, tmp_path=tmp_path)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_zero2_frozen_parameter_from_the_model_weights(trainer_checkpoint, tmp_path):
    # At ZeRO-1/2 a frozen parameter has no optimizer state: the shard job reads it from the model weights, as
    # the universal conversion's fallback does.
    tag = trainer_checkpoint("gpt2_z2_fp32_frozen", model="gpt2", zero_stage=2, dtype="fp32",
                             freeze=["transformer.wpe.weight"])
    _, universal = export(tag, tmp_path, tmp_path / "hf")
    assert not universal.exists()
    ours, theirs = safetensors_state(tmp_path / "hf"), zero_to_fp32(tag)
    assert "transformer.wpe.weight" in ours and sorted(ours) == sorted(set(theirs) - {"lm_head.weight"})
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    params = next((tmp_path / "ucpflow-work").glob("*/*/index/params.tsv")).read_text().splitlines()
    assert any(line.startswith("transformer.wpe.weight\tmodule\t") for line in params)


def test_autotp_checkpoint_with_the_config_given_by_hf_config(autotp_checkpoint, tmp_path):
    from ucpflow.demo.autotp.train import build_parser, causal_lm

    tag = autotp_checkpoint(AUTOTP, **AUTOTP_CASES[AUTOTP])
    args = build_parser().parse_args(["--model", AUTOTP_CASES[AUTOTP]["model"]])
    causal_lm(args).config.save_pretrained(tmp_path / "config")
    _, universal = export(tag, tmp_path, tmp_path / "hf", hf_config=tmp_path / "config", hf_dtype="bf16")
    # zero_to_fp32 cannot merge tensor-parallel slices: the reference is the universal checkpoint (which the
    # export merged the same way without writing it), converted afterwards and read by torch.
    assert not universal.exists()
    snakemake(tmp_path, config={"input_folder": tag, "output_folder": universal, "hf_config": tmp_path / "config"},
              check=True)
    reference = {path.parent.name: torch.load(path, weights_only=False)["param"]
                 for path in (universal / "zero").glob("*/fp32.pt")}
    ours = safetensors_state(tmp_path / "hf")
    assert sorted(ours) == sorted(reference)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    check_loads_and_matches(tmp_path / "hf", {name: tensor.float() for name, tensor in ours.items()})


def test_the_model_config_is_found_beside_or_above_the_tag_folder_or_named(tmp_path):
    from ucpflow.errors import UcpflowError
    from ucpflow.source.hfconfig import find_model_config

    tag = tmp_path / "out" / "checkpoint-4" / "global_step4"
    tag.mkdir(parents=True)
    assert find_model_config(tag) is None
    (tmp_path / "out" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert find_model_config(tag) == tmp_path / "out"
    (tag.parent / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert find_model_config(tag) == tag.parent
    assert find_model_config(tag, tmp_path / "out" / "config.json") == tmp_path / "out"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"train_batch_size": 8}))  # a DeepSpeed config
    with pytest.raises(UcpflowError, match="hf_config.*is not a transformers model config"):
        find_model_config(tag, tmp_path / "other")


def test_safetensors_written_tensor_by_tensor_read_back_as_torch_casts_them(tmp_path):
    from safetensors.torch import load_file

    from ucpflow.export.safetensors_out import write_safetensors

    values = {"b.weight": torch.randn(3, 5) * 1e3, "a.bias": torch.randn(7), "c.idx": torch.arange(6).reshape(2, 3),
              "d.huge": torch.tensor([1e6, -7e4, 3.3])}
    dtypes = {"b.weight": "bfloat16", "a.bias": "float32", "c.idx": "int64", "d.huge": "float16"}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {name: (dtypes[name], list(values[name].shape)) for name in values},
                      lambda name: values[name].numpy(), metadata={"format": "pt"})
    loaded = load_file(path)
    assert sorted(loaded) == sorted(values)
    for name, tensor in values.items():
        assert torch.equal(loaded[name], tensor.to(getattr(torch, dtypes[name]))), name
    assert not list(tmp_path.glob(".*partial*"))
