"""The jobs of `snakemake reshard`: a plan (what the target tag folder holds), one job per rank file, and a
finalize that writes `latest` last.

Every job that changes the reshard folder retracts its `latest` first, so a run that fails or is killed
part-way leaves no `latest` naming an incomplete folder.
"""

import importlib.util
import json
import os
import re
from pathlib import Path

from .. import dsconst as C
from ..errors import UcpflowError
from ..fileio import copy_file, remove_leftovers, write_text
from ..source.layout import discover, load_structure
from ..markers import retract, write_marker
from ..tables import IndexFiles, Layout, read_index_record, read_parameters
from .carry import carried_files, copy_side_files
from .overview import reshard_overview
from .source import (
    MODULE,
    check_parameters,
    frozen_parameters,
    optimized_groups,
    read_source,
    saved_precision,
)
from .write import (
    Target,
    model_file_name,
    optim_file_name,
    write_model_file,
    write_optimizer_file,
)

RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")  # engine._copy_recovery_script
STATE_FILE = re.compile(r".*_(model|optim)_states\.pt")
UNIVERSAL_HINT = ("convert it with `snakemake` to the universal checkpoint instead and load that with "
                  '"checkpoint": {"load_universal": true}, which DeepSpeed resumes at any TP, PP and EP degree')


def deepspeed_folder() -> Path:
    """The installed DeepSpeed package's folder, found without importing it."""
    spec = importlib.util.find_spec("deepspeed")
    return Path(list(spec.submodule_search_locations)[0])


def check_source(layout: Layout) -> None:
    """Refuse the sources whose rank files are not plain data-parallel ZeRO partitions."""
    folder = layout.folder
    if layout.tp_degree > 1 or layout.pp_degree > 1:
        raise UcpflowError(f"{folder} is a tensor/pipeline-parallel checkpoint (tp={layout.tp_degree}, "
                           f"pp={layout.pp_degree}), which reshard does not write; {UNIVERSAL_HINT}.")
    if layout.autoep_metadata:
        raise UcpflowError(f"{folder} is an AutoEP (expert-parallel) checkpoint, which reshard does not write; "
                           f"{UNIVERSAL_HINT}.")
    if layout.megatron_model:
        raise UcpflowError(f"{folder} is a Megatron-DeepSpeed checkpoint, which reshard does not write; {UNIVERSAL_HINT}.")


def check_precision(source_dtype: str, target_dtype: str, folder: str) -> None:
    """fp16 engines restore their dynamic loss scaler from the checkpoint, so fp16 is kept as fp16 only."""
    if (source_dtype == "fp16") != (target_dtype == "fp16"):
        raise UcpflowError(f"Config key `target_dtype`: {folder} was trained in {source_dtype} and cannot be resharded "
                           f"to {target_dtype} (DeepSpeed restores the fp16 loss scaler from the checkpoint); choose "
                           f"{'fp16' if source_dtype == 'fp16' else 'bf16 or fp32'}.")


def plan_job(layout_path: str, params_path: str, output: str, *, reshard_folder: str, target_dp: int | None,
             target_stage: int | None, target_dtype: str, sub_group_size: int) -> str:
    """Write the plan: the target's degree, stage and precision (defaults: the source's) and its files."""
    record = read_index_record(layout_path)
    layout = record.layout
    check_source(layout)
    check_parameters(read_parameters(params_path), layout.folder)
    source_dtype = saved_precision(layout.model_files[0])
    target = Target(int(target_dp or layout.dp_degree), int(target_stage or layout.zero_stage),
                    target_dtype or source_dtype)
    check_precision(source_dtype, target.dtype, layout.folder)
    tag = os.path.basename(os.path.normpath(layout.folder))
    model_ranks = range(target.dp) if target.stage > 2 else range(1)
    plan = {
        "tag": tag,
        "source": {"dp": layout.dp_degree, "stage": layout.zero_stage, "dtype": source_dtype},
        "target": {"dp": target.dp, "stage": target.stage, "dtype": target.dtype},
        "sub_group_size": sub_group_size,
        "model_files": {model_file_name(target, rank): rank for rank in model_ranks},
        "optim_files": {optim_file_name(target, rank): rank for rank in range(target.dp)},
        "carry": carried_files(record.hf_config_folder, layout.folder, reshard_folder),
    }
    retract(os.path.join(reshard_folder, C.LATEST_FILE))
    write_text(output, json.dumps(plan, indent=1) + "\n")
    left = "".join(f"; not carried: {name} ({reason})" for name, reason in plan["carry"]["left"].items())
    return (f"{target.dp} ranks at ZeRO-{target.stage} {target.dtype} from dp={layout.dp_degree} "
            f"ZeRO-{layout.zero_stage} {source_dtype}{left}")


def _plan(plan_path: str):
    plan = json.loads(Path(plan_path).read_text())
    return plan, Target(**plan["target"])


def rank_file_job(plan_path: str, index: IndexFiles, map_paths: list[str], reshard_folder: str, output: str) -> None:
    """Write one model- or optimizer-states file of the target tag folder, reading the source's rank files
    through the index and the extraction maps `map_paths`."""
    plan, target = _plan(plan_path)
    name = os.path.basename(output)
    if name not in plan["model_files"] and name not in plan["optim_files"]:
        raise UcpflowError(f"{output} is not a file of the reshard plan {plan_path}.")
    retract(os.path.join(reshard_folder, C.LATEST_FILE))
    remove_leftovers(output)
    source = read_source(index, map_paths)
    try:
        if name in plan["model_files"]:
            write_model_file(source, target, plan["model_files"][name], output)
        else:
            write_optimizer_file(source, target, plan["optim_files"][name], output, plan["sub_group_size"])
    finally:
        source.close()


def carry_job(plan_path: str, reshard_folder: str, output: str) -> None:
    """Copy the HF Trainer's side files into the reshard folder; `output` records what was copied."""
    plan, _ = _plan(plan_path)
    retract(os.path.join(reshard_folder, C.LATEST_FILE))
    copy_side_files(plan["carry"], reshard_folder)
    write_text(output, json.dumps(plan["carry"], indent=1) + "\n")


def finalize_job(plan_path: str, reshard_folder: str, output: str) -> str:
    """Remove what an earlier plan left in the tag folder, add DeepSpeed's recovery scripts, write `latest` last."""
    plan, target = _plan(plan_path)
    tag_folder = os.path.join(reshard_folder, plan["tag"])
    expected = set(plan["model_files"]) | set(plan["optim_files"])
    for entry in os.scandir(tag_folder):
        if entry.is_file() and STATE_FILE.fullmatch(entry.name) and entry.name not in expected:
            os.unlink(entry.path)
    scripts = deepspeed_folder() / "utils"
    for script in RECOVERY_SCRIPTS:
        if (scripts / script).is_file():
            copy_file(scripts / script, os.path.join(reshard_folder, script))
    write_marker(output, plan["tag"])
    return f"wrote {reshard_folder}/{plan['tag']} for {target.dp} ranks at ZeRO-{target.stage} {target.dtype}"


def inspect_job(input_folder: str, output: str, *, target_dp: int | None, target_stage: int | None, target_dtype: str,
                sub_group_size: int) -> str:
    """Write (and return) a Markdown table of the files reshard would write and their tensor bytes."""
    layout = discover(input_folder)
    check_source(layout)
    path = layout.model_files[0]
    model_state = load_structure(path)
    groups = optimized_groups(path, model_state)
    buffers = set(model_state.get(C.BUFFER_NAMES) or [])
    buffer_bytes = sum(value.nbytes for name, value in model_state[MODULE].items() if name in buffers)
    source_dtype = saved_precision(path)
    target = Target(int(target_dp or layout.dp_degree), int(target_stage or layout.zero_stage),
                    target_dtype or source_dtype)
    check_precision(source_dtype, target.dtype, layout.folder)
    rows = reshard_overview(groups, frozen_parameters(model_state, groups), buffer_bytes, target, sub_group_size)
    lines = [f"reshard of {layout.folder} (dp={layout.dp_degree}, ZeRO-{layout.zero_stage}, {source_dtype}) "
             f"to dp={target.dp}, ZeRO-{target.stage}, {target.dtype}:", "",
             "| file | kind | rank | tensor bytes |", "|---|---|---|---|"]
    lines += [f"| {row['file']} | {row['kind']} | {row['rank']} | {row['bytes']:,} |" for row in rows]
    lines.append(f"| total | | | {sum(row['bytes'] for row in rows):,} |")
    text = "\n".join(lines) + "\n"
    write_text(output, text)
    return text
