"""Which files make up a DeepSpeed checkpoint and how they map onto pipeline, tensor and data ranks.

The rules mirror the installed DeepSpeed's `ds_to_universal` (file globbing, sort orders, degree
inference), so that ucpflow reads exactly the files DeepSpeed would. Where DeepSpeed would silently
convert an incomplete folder (a missing data-parallel rank file just lowers its inferred degree), the
layout is checked against the degrees the checkpoint itself records, and the problem is reported.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..tables import Layout, RankFile
from .autoep import autoep_metadata, is_partitioned

LAYER_FILE_PATTERN = r"layer_(\d+)-model_.*"
ZERO3_FILE_PATTERN = r"(?:bf16_)?zero_pp_rank_"
ZERO3_RANKS_PATTERN = r"(?:bf16_)?zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)"
ZERO_PARTITION_GROUPS = "ds_zero_partition_groups"


def natural_keys(text: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def resolve_tag_folder(input_folder: Path | str) -> Path:
    """The folder holding the rank files: `input_folder` itself, or the tag named by its `latest` file."""
    folder = Path(input_folder)
    if not folder.exists():
        raise CheckpointError(f"Input folder {folder} does not exist.")
    if not folder.is_dir():
        raise CheckpointError(f"Input folder {folder} is a file, not a checkpoint folder.")
    if glob.glob(str(folder / "*_optim_states.pt")):
        return folder
    latest = folder / C.LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        tag_folder = folder / tag
        if not tag_folder.is_dir():
            raise CheckpointError(f"{latest} names tag {tag!r}, but {tag_folder} does not exist.")
        return tag_folder
    tags = sorted((entry for entry in folder.glob("global_step*") if glob.glob(str(entry / "*_optim_states.pt"))),
                  key=lambda entry: (len(entry.name), entry.name))
    if tags:
        raise CheckpointError(
            f"{folder} holds no `latest` file but the tag folder(s) {', '.join(tag.name for tag in tags)}: "
            f"set input_folder={tags[-1]} (or write its tag into {folder / 'latest'})."
        )
    raise CheckpointError(
        f"{folder} holds no DeepSpeed optimizer files (*_optim_states.pt) and no `latest` file naming a tag folder."
    )


def load_structure(path: Path | str) -> Any:
    """A checkpoint file's pickled structure, tensors left on disk."""
    return ptfile.load(path)


def has_megatron_args(structure: object) -> bool:
    """Whether a model-states structure holds Megatron's `args` (a Megatron-DeepSpeed GPT model's save)."""
    return hasattr(structure.get("args") if isinstance(structure, dict) else None, "num_layers")


def optimizer_state_of(path: Path | str, structure: object) -> dict:
    state = structure.get(C.OPTIMIZER_STATE_DICT) if isinstance(structure, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} has no `{C.OPTIMIZER_STATE_DICT}`: it is not a DeepSpeed optimizer-state file.")
    return state


def zero_stage_of(path: Path | str, structure: object) -> int:
    return int(optimizer_state_of(path, structure).get(C.ZERO_STAGE, 1))


def discover(input_folder: Path | str) -> Layout:
    """Read the checkpoint's file set and metadata (never tensor data) into a Layout."""
    folder = resolve_tag_folder(input_folder)
    optim_files = sorted(glob.glob(str(folder / "*_optim_states.pt")), key=natural_keys)
    zero3_files = [f for f in optim_files if re.match(ZERO3_FILE_PATTERN, os.path.basename(f))]
    first = (zero3_files or optim_files)[0]
    stage = zero_stage_of(first, load_structure(first))
    if stage > 2 and zero3_files:
        return _discover_stage3(folder, zero3_files, stage)
    return _discover_stage12(folder, stage)


def _all_files(folder):
    return [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]


def _with_prefix(files, prefix):
    return sorted(f for f in files if os.path.basename(f).startswith(prefix))


def _zero_files(files):
    """DeepSpeed's choice of ZeRO files: the first prefix that has any, sorted by (dp, mp) rank."""
    for prefix in (C.ZERO_FILE_PREFIX, C.FP16_ZERO_FILE_PREFIX, C.BF16_ZERO_FILE_PREFIX):
        chosen = _with_prefix(files, prefix)
        if chosen:
            ranked = []
            for path in chosen:
                match = re.search(f"{prefix}([0-9]+)_{C.MODEL_FILE_PREFIX}([0-9]+)", path)
                if match is None:
                    raise CheckpointError(f"Cannot read the data- and model-parallel ranks from the file name {path}.")
                ranked.append((int(match.group(1)), int(match.group(2)), path))
            return prefix, sorted(ranked)
    return None, []


def _parallel_degrees(folder, files, model_meta, zero_count):
    """(pp, tp) as DeepSpeed infers them: recorded dimensions first, else the count of layer_01 files."""
    recorded = {}
    for path, meta in model_meta:
        dims = meta.get(C.CHECKPOINT_PARALLEL_DIMS)
        if dims is not None:
            recorded[path] = (int(dims.get(C.CHECKPOINT_PP_DEGREE)), int(dims.get(C.CHECKPOINT_TP_DEGREE)))
    if recorded:
        if len(recorded) != len(model_meta):
            missing = next(path for path, _ in model_meta if path not in recorded)
            raise CheckpointError(f"{missing} lacks `{C.CHECKPOINT_PARALLEL_DIMS}` that the other model-state files record.")
        if len(set(recorded.values())) != 1:
            raise CheckpointError(f"The model-state files in {folder} disagree on `{C.CHECKPOINT_PARALLEL_DIMS}`.")
        pp, tp = next(iter(recorded.values()))
        if len(model_meta) != pp * tp:
            raise CheckpointError(
                f"{folder} has {len(model_meta)} model-state files, but the checkpoint records pp={pp} x tp={tp}."
            )
        return pp, tp
    first_layer_files = _with_prefix(files, C.LAYER_FILE_PREFIX + "01")
    if first_layer_files:
        tp = len(first_layer_files)
        return len(model_meta) // tp, tp
    return 1, len(model_meta)


def _check_layer_files(folder, layer_files, tp, model_meta):
    """Every pipeline layer that holds parameters must have one layer file per tensor-parallel rank."""
    present = {os.path.basename(f) for f in layer_files}
    layers = {int(re.fullmatch(LAYER_FILE_PATTERN, name).group(1)) for name in present}
    for _, meta in model_meta:
        for group in meta.get(C.PARAM_SHAPES) or []:
            layers.update(int(name.split(".", 1)[0]) for name in group if name.split(".", 1)[0].isdigit())
    for layer in sorted(layers):
        for rank in range(tp):
            name = f"{C.LAYER_FILE_PREFIX}{layer:02d}-model_{rank:02d}-model_states.pt"
            if name not in present:
                raise CheckpointError(
                    f"{os.path.join(folder, name)} is missing: pipeline layer {layer} needs a layer file "
                    f"for each of the {tp} tensor-parallel ranks."
                )


def _expected_rank_name(prefix, dp, mp):
    return f"{prefix}{dp}_{C.MODEL_FILE_PREFIX}{mp:02d}{C.OPTIM_FILE_SUFFIX}"


def _check_autoep_zero3(path, structure, tp):
    """ZeRO-3 AutoEP converts only from DeepSpeed's partition-native format, and without AutoTP folding."""
    layers = autoep_metadata(structure)
    if not layers:
        return
    if not is_partitioned(layers):
        raise CheckpointError(
            f"{path}: Stage 3 universal checkpoint conversion for AutoEP requires the partition-native "
            "AutoEP ZeRO-3 checkpoint format."
        )
    if tp > 1:
        raise CheckpointError(
            f"{path}: Universal checkpoint conversion of an AutoEP + AutoTP folded ZeRO-3 checkpoint is not "
            "supported yet. Load it with the same topology."
        )


def _check_same_global_steps(model_meta):
    steps = {}
    for path, meta in model_meta:
        if "global_steps" in meta:
            steps.setdefault(meta["global_steps"], path)
    if len(steps) > 1:
        (step_a, path_a), (step_b, path_b) = list(steps.items())[:2]
        raise CheckpointError(
            f"{path_b} is from global step {step_b} but {path_a} from step {step_a}: "
            "the folder mixes files from different checkpoints."
        )


def _discover_stage12(folder, stage):
    files = _all_files(folder)
    layer_files = sorted(f for f in files if re.fullmatch(LAYER_FILE_PATTERN, os.path.basename(f)))
    model_files = _with_prefix(files, C.MODEL_FILE_PREFIX)
    if not model_files:
        raise CheckpointError(f"{folder} has no model-state files ({C.MODEL_FILE_PREFIX}*{C.MODEL_FILE_SUFFIX}).")
    if layer_files and not _with_prefix(files, C.LAYER_FILE_PREFIX + "01"):
        raise CheckpointError(f"{folder} has pipeline layer files but no {C.LAYER_FILE_PREFIX}01* files.")
    model_meta = [(path, load_structure(path)) for path in model_files]
    _check_same_global_steps(model_meta)
    prefix, zero_files = _zero_files(files)
    if not zero_files:
        raise CheckpointError(f"{folder} has no ZeRO optimizer files (*zero_pp_rank_*{C.OPTIM_FILE_SUFFIX}).")
    pp, tp = _parallel_degrees(folder, files, model_meta, len(zero_files))
    if layer_files:
        _check_layer_files(folder, layer_files, tp, model_meta)
    first_meta = model_meta[0][1]
    recorded_dp = first_meta.get("dp_world_size")
    dp = int(recorded_dp) if recorded_dp else max(1, len(zero_files) // (pp * tp))
    by_rank = {(dp_rank, mp_rank): path for dp_rank, mp_rank, path in zero_files}
    for dp_rank in range(dp):
        for mp_rank in range(pp * tp):
            if (dp_rank, mp_rank) not in by_rank:
                expected = os.path.join(folder, _expected_rank_name(prefix, dp_rank, mp_rank))
                raise CheckpointError(
                    f"{expected} is missing: the checkpoint was saved with pp={pp}, tp={tp}, dp={dp} "
                    f"and needs {pp * tp * dp} optimizer files, found {len(zero_files)}."
                )
    if len(zero_files) != pp * tp * dp:
        extra = next(path for dp_rank, mp_rank, path in zero_files if dp_rank >= dp or mp_rank >= pp * tp)
        raise CheckpointError(f"{extra} does not belong to a checkpoint saved with pp={pp}, tp={tp}, dp={dp}.")
    rank_files = [
        RankFile(path=by_rank[(d, p * tp + t)], pp=p, tp=t, dp=d)
        for p in range(pp)
        for t in range(tp)
        for d in range(dp)
    ]
    return Layout(
        folder=str(folder),
        zero_stage=stage,
        pp_degree=pp,
        tp_degree=tp,
        dp_degree=dp,
        rank_files=rank_files,
        model_files=model_files,
        copy_files=model_files,
        universal_info=first_meta.get(C.UNIVERSAL_CHECKPOINT_INFO),
        global_steps=int(first_meta.get("global_steps", 0) or 0),
        megatron_model=has_megatron_args(first_meta),
    )


def _zero3_grid(files, what):
    grid = {}
    for path in files:
        match = re.search(ZERO3_RANKS_PATTERN, os.path.basename(path))
        if match is None:
            raise CheckpointError(f"Cannot read the ZeRO-3 ranks from the file name {path}.")
        dp_rank, tp_rank = int(match.group(1)), int(match.group(2))
        grid[(tp_rank, dp_rank)] = path
    tp = max(t for t, _ in grid) + 1
    dp = max(d for _, d in grid) + 1
    for t in range(tp):
        for d in range(dp):
            if (t, d) not in grid:
                raise CheckpointError(f"The {what} file for ZeRO-3 tp rank {t}, dp rank {d} is missing.")
    return grid, tp, dp


def _discover_stage3(folder, optim_files, stage):
    model_files = [
        f
        for f in sorted(glob.glob(str(folder / f"*{C.MODEL_FILE_SUFFIX}")), key=natural_keys)
        if not is_expert_file(f)
    ]
    if not model_files:
        raise CheckpointError(f"{folder} has no ZeRO-3 model-state files (*{C.MODEL_FILE_SUFFIX}).")
    model_grid, tp, dp = _zero3_grid(model_files, "model-state")
    optim_grid, tp_optim, dp_optim = _zero3_grid(optim_files, "optimizer-state")
    if (tp, dp) != (tp_optim, dp_optim):
        raise CheckpointError(
            f"{folder} has model-state files for tp={tp}, dp={dp} but optimizer files for tp={tp_optim}, dp={dp_optim}."
        )
    model_meta = [(path, load_structure(path)) for path in model_files]
    for path, meta in model_meta:
        _check_autoep_zero3(path, meta, tp)
    _check_same_global_steps(model_meta)
    first_meta = model_meta[0][1]
    return Layout(
        folder=str(folder),
        zero_stage=stage,
        pp_degree=1,
        tp_degree=tp,
        dp_degree=dp,
        rank_files=[RankFile(path=optim_grid[(t, d)], pp=0, tp=t, dp=d) for t in range(tp) for d in range(dp)],
        model_files=[model_grid[(t, d)] for t in range(tp) for d in range(dp)],
        copy_files=model_files,
        universal_info=first_meta.get(C.UNIVERSAL_CHECKPOINT_INFO) or {},
        global_steps=int(first_meta.get("global_steps", 0) or 0),
        megatron_model=has_megatron_args(first_meta),
    )


def is_expert_file(path: Path | str) -> bool:
    name = os.path.basename(path)
    return name.startswith(C.LAYER_FILE_PREFIX) and "_expert_" in name
