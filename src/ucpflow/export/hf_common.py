"""What every `hf` export shares: transformers' file names, dtypes and how it orders and shards tensors."""

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import UcpflowError
from ..smk import job_memory_mb, job_runtime_minutes

GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE_STEM = "model"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ITEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# The plan's `source` when a transformers model's tensors are merged straight from the rank files.
TRANSFORMERS_SOURCE = "transformers"


def parse_size(size: int | str) -> int:
    """Bytes of a size given as an integer or as transformers spells it ("5GB", "200MB": powers of 1000)."""
    if isinstance(size, int):
        return size
    text = str(size).strip()
    unit = text[-2:].upper()
    try:
        return int(float(text[:-2]) * SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise UcpflowError(f"Config key `hf_max_shard_size`: {size!r} is not a byte count or a size such as 5GB.") \
            from None


def save_order(name: str) -> list[tuple[int, int, str]]:
    """transformers 5 saves a model's tensors sorted by name part by part, numbers numerically."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def split_into_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Lists of tensor names, one per file, as huggingface_hub's split_torch_state_dict_into_shards makes
    them: in order, a new file when the next tensor would overflow, and a tensor larger than the limit
    in a file of its own, listed before the file being filled."""
    shards, current, current_bytes = [], [], 0
    for name, size in sizes.items():
        if size > max_bytes:
            shards.append([name])
            continue
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    if current:
        shards.append(current)
    return shards


def shard_stems(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE_STEM]
    return [f"{SINGLE_FILE_STEM}-{i + 1:05d}-of-{count:05d}" for i in range(count)]


def _shard_numels(plan: Mapping[str, Any], stem: str) -> list[int]:
    return [math.prod(plan["tensors"][name]["shape"]) for name in plan["shards"][stem]]


def shard_memory_mb(plan: Mapping[str, Any], stem: str) -> int:
    """MB a job writing safetensors file `stem` of `plan` needs: a transformers model's job streams one tensor at
    a time (its fp32 fragments, the merged tensor, the cast copy); a Megatron model's holds the file's tensors
    in the export dtype until it writes them."""
    numels = _shard_numels(plan, stem)
    held = 4 * 4 * max(numels, default=0)
    if plan.get("source") != TRANSFORMERS_SOURCE:
        held += ITEM_BYTES[plan["dtype"]] * sum(numels)
    return job_memory_mb(held)


def shard_runtime_minutes(plan: Mapping[str, Any], stem: str) -> int:
    """Minutes for the job writing `stem`: its tensors' fp32 bytes read at a pessimistic 50 MB/s, plus start-up."""
    return job_runtime_minutes(4 * sum(_shard_numels(plan, stem)))
