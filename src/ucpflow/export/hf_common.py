"""What every `hf` export shares: transformers' file names, dtypes and how it orders and shards tensors."""

import re
from collections.abc import Mapping

from ..errors import UcpflowError

GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_FILE_STEM = "model"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ITEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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
