"""What transformers' `save_pretrained` writes for a model config, weights aside: the tensors in saving order
with their shapes and dtype, every name the model knows, its config and generation config as saved.

Describing a model imports torch and transformers and builds it on the meta device: seconds, the largest
fixed cost of an `hf` export. The description depends only on the config files, the dtype and the library
versions, so it is kept in a cache folder under that key (`$UCPFLOW_CACHE_DIR`, else
`$XDG_CACHE_HOME/ucpflow`, else `~/.cache/ucpflow`): the export of every further save of a training run
imports neither library. A cache entry that cannot be read is described again; one that cannot be written
is not an error.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UcpflowError
from ..fileio import write_text
from ..source.hfconfig import CONFIG_FILE
from .hf_common import GENERATION_CONFIG_FILE, save_order

if TYPE_CHECKING:
    import torch
    import transformers

CACHE_ENV = "UCPFLOW_CACHE_DIR"
# Raised when what a description holds changes, so that older entries are not read.
DESCRIPTION_FORMAT = 1
# What the description depends on besides the config files and the dtype.
LIBRARIES = ("transformers", "huggingface_hub")


def cache_folder() -> Path:
    """Where model descriptions are kept."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "models"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ucpflow" / "models"


def _library_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def description_key(config_folder: Path | str, dtype: str) -> str:
    """A digest of everything a description depends on: config.json and generation_config.json as bytes, the
    dtype, the format and the library versions."""
    digest = hashlib.sha256(f"{DESCRIPTION_FORMAT}\0{dtype}\0".encode())
    for name in LIBRARIES:
        digest.update(f"{name}={_library_version(name)}\0".encode())
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
        path = Path(config_folder) / name
        digest.update(path.read_bytes() if path.is_file() else b"(none)")
        digest.update(b"\0")
    return digest.hexdigest()


def meta_model(config: transformers.PreTrainedConfig) -> transformers.PreTrainedModel:
    """The model of `config` on the meta device (its architecture class, else AutoModelForCausalLM)."""
    import torch
    import transformers

    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"):
        if model_class is not None:
            return model_class._from_config(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def saved_state_dict(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained writes: the state dict without tied copies, in the order of a model that
    from_pretrained loaded (sorted by name part by part), which decides the sharding."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    if list(revert_weight_conversion(model, dict(state_dict))) != list(state_dict):
        raise UcpflowError(f"{type(model).__name__} renames or converts its weights when saving, which the hf "
                           "export does not support.")
    return dict(sorted(state_dict.items(), key=lambda item: save_order(item[0])))


def generation_config(config_folder: Path | str, config: transformers.PreTrainedConfig) -> dict[str, Any]:
    """The checkpoint's generation config, or the one transformers derives from the model config."""
    path = Path(config_folder) / GENERATION_CONFIG_FILE
    if path.is_file():
        return json.loads(path.read_text())
    from transformers import GenerationConfig

    return json.loads(GenerationConfig.from_model_config(config).to_json_string(use_diff=True))


def describe(config_folder: Path | str, dtype: str) -> dict[str, Any]:
    """The description of the model that config_folder/config.json configures, its weights in `dtype`."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_folder)
    model = meta_model(config).to(getattr(torch, dtype))
    known = {name for name, _ in model.named_parameters(remove_duplicate=False)} | set(model.state_dict())
    saved = saved_state_dict(model)
    config.dtype = dtype
    config.architectures = [type(model).__name__]
    return {
        "format": DESCRIPTION_FORMAT,
        "model": type(model).__name__,
        "known": sorted(known),
        "saved": [[name, list(tensor.shape), str(tensor.dtype).removeprefix("torch.")] for name, tensor in saved.items()],
        "total_parameters": model.num_parameters(),
        "config": json.loads(config.to_json_string(use_diff=True)),
        "generation_config": generation_config(config_folder, config),
    }


def _read_cached(path: Path) -> dict[str, Any] | None:
    try:
        description = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return description if isinstance(description, dict) and description.get("format") == DESCRIPTION_FORMAT else None


def model_description(config_folder: Path | str, dtype: str) -> tuple[dict[str, Any], bool]:
    """(the description of config_folder's model in `dtype`, whether it came from the cache)."""
    path = cache_folder() / f"{description_key(config_folder, dtype)}.json"
    cached = _read_cached(path)
    if cached is not None:
        return cached, True
    description = describe(config_folder, dtype)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(description) + "\n")
    except OSError as problem:
        print(f"ucpflow: the model description was not cached in {path.parent}: {problem.strerror or problem}")
    return description, False
