"""Export of a transformers model trained with DeepSpeed (HF Trainer, Accelerate: DP-only ZeRO-1/2/3 or AutoTP)
to a transformers model folder, as `save_pretrained` writes it:

    config.json                      the checkpoint's model config with the exported dtype; written last
    generation_config.json           the checkpoint's, or the one transformers derives from the config
    tokenizer files                  copied when the config's folder holds them
    model.safetensors                or model-0000i-of-0000n.safetensors + model.safetensors.index.json

The plan job needs only the index and the model's description, which transformers makes on the meta device
from the config (and ucpflow caches: model_description.py), so the tensors saved, their order, the tied
weights left out and the sharding are transformers' own. No universal checkpoint
is written: each shard job merges every tensor's fp32 weight straight from the rank files, through the
extraction maps and the universal conversion's own merge (`merge.merged_weight`: over data- and
tensor-parallel ranks, with the model-weight fallback), so it equals the universal `zero/<param>/fp32.pt`;
what the universal conversion leaves out at ZeRO-3 (frozen parameters, buffers) comes from the model-states
files. Shard jobs import neither torch nor transformers and hold one tensor at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import ptfile
from ..errors import CheckpointError
from ..fileio import FileRange, copy_file, write_text
from ..markers import write_marker
from ..source.hfconfig import CONFIG_FILE
from ..stages.merge import BucketMerger
from ..tables import FORMAT_MODULE, IndexFiles, Layout, Parameter, read_parameters
from .hf_common import TRANSFORMERS_SOURCE, parse_size
from .model_description import model_description
from .safetensors_out import FLOATS, write_safetensors


SOURCE = TRANSFORMERS_SOURCE
OUTPUT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
# Where a tensor's values come from: merged from the rank files as the universal conversion merges its
# parameter, ZeRO-3's frozen-parameter fragments in the model-states files, or a model-states module weight.
MERGED, FRAGMENTS, MODULE = "merged", "fragments", "module"


def float_array(tensor: ptfile.TensorRef) -> np.ndarray:
    """A checkpoint tensor's values as numpy (floats as float32; bfloat16 read from its bits)."""
    array = tensor.read_array()
    if tensor.dtype == "bfloat16":
        return ptfile.bfloat16_bits_to_float32(array)
    return array.astype(np.float32) if tensor.dtype in FLOATS else array


def checkpoint_tensors(layout: Layout, params: list[Parameter]
                       ) -> tuple[dict[str, dict[str, Any]], set[str], dict[str, str], dict[str, Any]]:
    """({name: source}, frozen names, {name: shared with}) of every tensor the checkpoint holds."""
    state = ptfile.load(layout.model_files[0])
    buffers = set(state.get("buffer_names") or ())
    frozen_shapes = state.get("frozen_param_shapes") or {}
    sources = {row.param: {"kind": MERGED, "param": row.param} for row in params}
    frozen = set(frozen_shapes) | {row.param for row in params if row.format == FORMAT_MODULE and row.param not in buffers}
    if layout.zero_stage > 2:
        if frozen_shapes and layout.tp_degree > 1:
            raise CheckpointError(f"{layout.model_files[0]} holds frozen parameters of a ZeRO-3 AutoTP model, "
                                  "which the hf export does not support.")
        for name, shape in frozen_shapes.items():
            sources[name] = {"kind": FRAGMENTS, "files": layout.model_files, "numel": math.prod(shape)}
        for name in buffers:
            sources[name] = {"kind": MODULE, "file": layout.model_files[0]}
    return sources, frozen, dict(state.get("shared_params") or {}), state


def training_dtype(state: Mapping[str, Any]) -> str:
    module = state.get("module") or {}
    for tensor in module.values():
        if isinstance(tensor, ptfile.TensorRef) and tensor.dtype in FLOATS:
            return tensor.dtype
    return "float32"


def transformers_plan(config_folder: str, layout: Layout, params: list[Parameter], hf_dtype: str, exclude_frozen: bool,
                      max_shard_size: int | str) -> tuple[dict[str, Any], bool]:
    """(what the export writes: every tensor save_pretrained would save, with where its values come from, split
    into files as huggingface_hub splits them, and the config files; whether the model's description came from
    the cache, see model_description)."""
    from huggingface_hub import split_state_dict_into_shards_factory

    sources, frozen, shared, state = checkpoint_tensors(layout, params)
    dtype = training_dtype(state) if hf_dtype == "auto" else OUTPUT_DTYPES[hf_dtype or "fp32"]
    description, cached = model_description(config_folder, dtype)
    model = description["model"]
    unexpected = sorted(set(sources) - set(description["known"]))
    if unexpected:
        raise CheckpointError(f"Parameter {unexpected[0]} of the checkpoint ({len(unexpected)} in all) is not part of "
                              f"{model} built from {Path(config_folder) / CONFIG_FILE}.")
    tensors = {}
    for name, shape, tensor_dtype in description["saved"]:
        if exclude_frozen and name in frozen:
            continue
        source = sources.get(name) or sources.get(shared.get(name))
        if source is None:
            raise CheckpointError(f"The checkpoint holds no tensor {name} of {model} (built from "
                                  f"{Path(config_folder) / CONFIG_FILE}).")
        tensors[name] = {**source, "shape": shape, "dtype": tensor_dtype}
    # As split_torch_state_dict_into_shards splits meta tensors: by their bytes, none sharing storage.
    split = split_state_dict_into_shards_factory(
        tensors, get_storage_size=lambda spec: math.prod(spec["shape"]) * ptfile.numpy_dtype(spec["dtype"]).itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=parse_size(max_shard_size))
    shards = {file.removesuffix(".safetensors"): names for file, names in split.filename_to_tensors.items()}
    index = {"metadata": {"total_parameters": description["total_parameters"], **split.metadata},
             "weight_map": split.tensor_to_filename} if split.is_sharded else None
    folder = Path(config_folder)
    plan = {
        "source": SOURCE,
        "model": model,
        "dtype": dtype,
        "tensors": tensors,
        "shards": shards,
        "index": index,
        "config": description["config"],
        "generation_config": description["generation_config"],
        "copy_files": [str(folder / name) for name in TOKENIZER_FILES if (folder / name).is_file()],
    }
    return plan, cached


def plan_job(config_folder: str, layout: Layout, params_path: str, hf_dtype: str, exclude_frozen: bool,
             max_shard_size: int | str) -> dict:
    plan, cached = transformers_plan(config_folder, layout, read_parameters(params_path), hf_dtype, exclude_frozen,
                                     max_shard_size)
    described = "cached description" if cached else "described with transformers"
    print(f"{plan['model']} from {Path(config_folder) / CONFIG_FILE} ({described}): {len(plan['tensors'])} tensors, "
          f"{plan['dtype']}, {len(plan['shards'])} safetensors file(s)")
    return plan


def tensor_values(merger: BucketMerger, spec: Mapping[str, Any]) -> np.ndarray | list[FileRange]:
    """One planned tensor's values, of its shape, as numpy (floats as float32); or, where the rank files
    hold its bytes as they are to be written, those byte ranges (copied by the kernel, never held here)."""
    shape = spec["shape"]
    if spec["kind"] == MERGED:
        in_place = merger.weight_ranges(spec["param"])
        if in_place is not None and in_place[1] == spec["dtype"]:
            return in_place[0]
        array, dtype = merger.weight(spec["param"])
        if dtype == "bfloat16":
            return ptfile.bfloat16_bits_to_float32(array).reshape(shape)
        return array.astype(np.float32, copy=False).reshape(shape)
    if spec["kind"] == MODULE:
        return float_array(ptfile.load(spec["file"])["module"][spec["name"]]).reshape(shape)
    pieces = [float_array(ptfile.load(path)["frozen_param_fragments"][spec["name"]]).reshape(-1)
              for path in spec["files"]]
    return np.concatenate(pieces)[:spec["numel"]].reshape(shape)


def shard_job(plan: dict, stem: str, output: str, index: IndexFiles, map_paths: list[str]) -> None:
    """Write one planned safetensors file, merging its tensors from the rank files that `index` and the
    extraction maps `map_paths` locate."""
    names = plan["shards"][stem]
    specs = {name: {**plan["tensors"][name], "name": name} for name in names}
    merger = BucketMerger(None, index, map_paths, names={spec["param"] for spec in specs.values() if spec["kind"] == MERGED})
    try:
        write_safetensors(output, {name: (spec["dtype"], spec["shape"]) for name, spec in specs.items()},
                          lambda name: tensor_values(merger, specs[name]), metadata={"format": "pt"},
                          written=merger.release)
    finally:
        merger.close()
    print(f"{output}: {len(names)} tensors")


def finalize_job(plan: Mapping[str, Any], generation_config_output: str, config_output: str) -> None:
    """Tokenizer files and generation_config.json, then config.json last."""
    folder = Path(config_output).parent
    for source in plan["copy_files"]:
        copy_file(source, folder / Path(source).name)
    write_text(generation_config_output, json.dumps(plan["generation_config"], indent=2, sort_keys=True) + "\n")
    write_marker(config_output, json.dumps(plan["config"], indent=2, sort_keys=True) + "\n")
    print(f"{folder}: {plan['model']}, {len(plan['copy_files'])} tokenizer file(s) copied")


def is_transformers_plan(plan: Mapping[str, Any]) -> bool:
    return plan.get("source") == SOURCE
