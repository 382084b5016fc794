"""Inspecting checkpoints from metadata alone: a folder's files, parameters, degrees and training args,
what would block its conversion, and the key tree of a single .pt file.

    python -m ucpflow.inspect FILE.pt        # key tree of one file, tensors as shape and dtype
    python -m ucpflow.inspect RUN_FOLDER     # one row per save of a training run
    snakemake --cores 1 inspect              # tables for the configured input_folder (see README)
"""

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from . import dsconst as C
from . import ptfile
from .errors import CheckpointError, UcpflowError
from .export.overview import targets_overview
from .fileio import atomic_writer, write_text
from .markdown import markdown_table
from .ptfile.guard import bounded_repr, refusal
from .source.fragments import build_index
from .source.hfconfig import find_model_config
from .source.layout import LAYER_FILE_PATTERN, ZERO3_RANKS_PATTERN, discover, resolve_tag_folder
from .runs import runs_table, runs_text
from .source.patterns import COLUMN_PARALLEL, ROW_PARALLEL, SUB_PARAMS, TWO_SUB_PARAMS, MergeRule, classify
from .source.saves import is_run_folder
from .source.trust import scan_folder
from .stages.index import assign_buckets
from .tables import (
    FORMAT_EXPERT,
    FORMAT_FLAT,
    Fragment,
    IndexFiles,
    Layout,
    Parameter,
    Shape,
    read_fragments,
    read_index_record,
    read_parameters,
    read_universal_info,
)

MAX_LIST_ITEMS = 8
CONCATENATED = (COLUMN_PARALLEL, ROW_PARALLEL, TWO_SUB_PARAMS, SUB_PARAMS)


EXPERT_FILE_PATTERN = r"layer_(\d+)_expert_(\d+)_mp_rank_\d+_model_states\.pt"


def file_kind(name: str) -> str:
    if name.endswith(C.OPTIM_FILE_SUFFIX):
        return "optimizer"
    if re.fullmatch(EXPERT_FILE_PATTERN, name):
        return "expert"
    if re.fullmatch(LAYER_FILE_PATTERN, name):
        return "layer"
    if name.endswith(C.MODEL_FILE_SUFFIX):
        return "model"
    return "other"


def _ranks_from_name(name):
    ranks = {"pp": "", "tp": "", "dp": ""}
    zero = re.search(ZERO3_RANKS_PATTERN, name) or re.search(r"zero_pp_rank_([0-9]+)_mp_rank_([0-9]+)", name)
    if zero:
        ranks["dp"], ranks["mp"] = int(zero.group(1)), int(zero.group(2))
    layer = re.fullmatch(r"layer_(\d+)-model_(\d+)-model_states\.pt", name)
    if layer:
        ranks["layer"], ranks["tp"] = int(layer.group(1)), int(layer.group(2))
    expert = re.fullmatch(EXPERT_FILE_PATTERN, name)
    if expert:
        ranks["layer"] = int(expert.group(1))
    model = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)
    if model:
        ranks["mp"] = int(model.group(1))
    return ranks


def files_table(folder: Path | str, layout: Layout | None = None) -> pd.DataFrame:
    rows = []
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        ranks = _ranks_from_name(path.name)
        mp = ranks.pop("mp", "")
        if layout is not None and mp != "" and layout.zero_stage <= 2:
            ranks["pp"], ranks["tp"] = divmod(mp, layout.tp_degree)
        elif layout is not None and mp != "":
            ranks["tp"] = mp
        rows.append(dict(file=path.name, kind=file_kind(path.name), layer=ranks.pop("layer", ""), **ranks,
                         bytes=path.stat().st_size))
    return pd.DataFrame(rows, columns=["file", "kind", "layer", "pp", "tp", "dp", "bytes"])


def universal_shape(shapes: Iterable[Shape | None], rule: MergeRule | None, info: Mapping[str, Any]) -> tuple[int, ...]:
    """The merged parameter's shape, from its per-tp-rank shapes and merge rule."""
    present = [tuple(s) for s in shapes if s is not None]
    if not present:
        return ()
    shape = list(present[0])
    if rule is not None and rule.kind in CONCATENATED and len(present) > 1:
        if rule.kind == ROW_PARALLEL:
            dim = 1
        elif rule.kind == SUB_PARAMS:
            dim = _partition_dim(rule.sub_params)
        else:
            dim = 0
        shape[dim] = sum(s[dim] for s in present)
    if rule is not None and rule.vocabulary and C.ORIGINAL_VOCAB_SIZE in info:
        shape[0] = info[C.ORIGINAL_VOCAB_SIZE]
    return tuple(shape)


def _partition_dim(entry):
    return entry["partition_dim"] if isinstance(entry, dict) else entry.partition_dim


def _model_dtypes(layout):
    """{parameter: dtype name} of the saved model weights, from module states or pipeline layer files."""
    dtypes = {}
    for path in layout.model_files:
        for name, tensor in (ptfile.load(path).get("module") or {}).items():
            dtypes.setdefault(name, tensor.dtype)
    for path in sorted(Path(layout.folder).glob("layer_*-model_00-model_states.pt")):
        layer = int(re.fullmatch(r"layer_(\d+)-model_00-model_states\.pt", path.name).group(1))
        for key, tensor in ptfile.load(path).items():
            if isinstance(tensor, ptfile.TensorRef):
                dtypes.setdefault(f"{layer}.{key}", tensor.dtype)
                dtypes.setdefault(f"tied_modules.embed.{key}", tensor.dtype)
    for path in sorted(Path(layout.folder).glob("layer_*_expert_0_mp_rank_*_model_states.pt")):
        for key, tensor in ptfile.load(path).items():
            if isinstance(tensor, ptfile.TensorRef):  # <expert_key_prefix>.w1.0: expert 0 of the fused w1
                dtypes.setdefault(key.rsplit(".", 1)[0], tensor.dtype)
    return dtypes


def parameters_table(layout: Layout, info: dict, fragments: list[Fragment], params: list[Parameter]) -> pd.DataFrame:
    dtypes = _model_dtypes(layout)
    first_stage = {}
    for fragment in fragments:
        first_stage[fragment.param] = min(fragment.pp, first_stage.get(fragment.param, fragment.pp))
    rows = []
    for row in params:
        rule = classify(info, row.param) if row.merge else None
        shape = universal_shape(row.shapes, rule, info) if row.format != FORMAT_FLAT else tuple(row.shapes[0])
        rows.append(dict(
            param=row.param,
            shape="x".join(str(d) for d in shape),
            dtype=dtypes.get(row.param, ""),
            numel=math.prod(shape),
            pp_stage=first_stage.get(row.param, ""),
            tp_merge=_merge_text(row),
            states=",".join(row.states),
            bytes=row.bytes,
            merge_job=row.bucket,
        ))
    return pd.DataFrame(rows, columns=PARAMETER_COLUMNS)


def _merge_text(row: Parameter) -> str:
    if row.format == FORMAT_EXPERT:
        return "AutoEP experts"
    return (row.merge or "model weights only") + (" + vocabulary" if row.vocabulary else "")


def _ranges(ids):
    """'0-1' for [0, 1], '0,2' for [0, 2]."""
    if ids and list(ids) == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1:
        return f"{ids[0]}-{ids[-1]}"
    return ",".join(str(i) for i in ids)


def experts_table(params: list[Parameter]) -> pd.DataFrame:
    """One row per AutoEP fused expert parameter: its experts, where each EP rank's experts come from, bytes."""
    rows = []
    for row in params:
        if row.format != FORMAT_EXPERT:
            continue
        plan = row.experts
        placement = "; ".join(
            f"ep {rank}: experts {_ranges(experts)} (dp {_ranges(dp)})"
            for rank, (experts, dp) in enumerate(zip(plan["experts"], plan["dp_ranks"]))
        )
        rows.append(dict(param=row.param, moe_layer=plan["layer"], experts=plan["num_experts"],
                         ep_size=len(plan["experts"]), placement=placement, bytes=row.bytes))
    return pd.DataFrame(rows, columns=EXPERT_COLUMNS)


def _args_table(folder, layout):
    source = layout.model_files[0] if layout else next(iter(sorted(Path(folder).glob(f"*{C.MODEL_FILE_SUFFIX}"))), None)
    if source is None:
        return pd.DataFrame(columns=["arg", "value"])
    try:
        structure = ptfile.load(source, [])  # stand-ins are shown, never run; findings are reported elsewhere
    except CheckpointError:
        structure = {}
    args = structure.get("args") if isinstance(structure, dict) else None
    values = vars(args) if hasattr(args, "__dict__") and not isinstance(args, ptfile.Opaque) else {}
    return pd.DataFrame(sorted((str(k), bounded_repr(v, 400)) for k, v in values.items()), columns=["arg", "value"])


def layout_summary(layout: Layout) -> dict[str, Any]:
    summary = dict(
        folder=layout.folder, zero_stage=layout.zero_stage, pp_degree=layout.pp_degree, tp_degree=layout.tp_degree,
        dp_degree=layout.dp_degree, rank_files=len(layout.rank_files), global_steps=layout.global_steps,
    )
    first = ptfile.load(layout.model_files[0])
    summary["iteration"] = first.get("iteration", layout.global_steps)
    summary["ds_version"] = first.get(C.DS_VERSION, "")
    summary["universal_checkpoint_info"] = layout.universal_info is not None
    return summary


def conversion_tables(layout: Layout, info: dict, fragments: list[Fragment], params: list[Parameter],
                      hf_config: str = "") -> tuple[dict, dict[str, pd.DataFrame]]:
    """(summary, tables) of an indexed checkpoint; `params` carries the merge plan's buckets, `hf_config` is the
    config key of that name."""
    summary = layout_summary(layout)
    summary.update(parameters=len(params), universal_bytes=sum(p.bytes for p in params), blockers=[])
    state = ptfile.load(layout.model_files[0])
    summary["exports"] = targets_overview(state.get("args"), state.get("checkpoint_version"), params,
                                          find_model_config(layout.folder, hf_config))
    experts = experts_table(params)
    if len(experts):
        summary.update(moe_layers=int(experts["moe_layer"].nunique()), experts=int(experts["experts"].max()),
                       ep_size=int(experts["ep_size"].max()), expert_bytes=int(experts["bytes"].sum()),
                       expert_placement=experts["placement"].iloc[0])
    tables = {
        "parameters": parameters_table(layout, info, fragments, params),
        "experts": experts,
        "files": files_table(layout.folder, layout),
        "args": _args_table(layout.folder, layout),
    }
    return summary, tables


def inspect_checkpoint(input_folder: Path | str, *, strict: bool = True, inject_missing_state: bool = False,
                       job_bytes: int = 4_000_000_000, min_jobs: int = 2,
                       hf_config: str = "") -> tuple[dict, dict[str, pd.DataFrame]]:
    """Everything inspect reports, as (summary dict, {table name: DataFrame}); problems become blockers."""
    folder = resolve_tag_folder(input_folder)
    findings = scan_folder(input_folder)
    if findings:
        problems = [f"{f.file} holds `{f.name}` at key {f.key}, a global outside ucpflow's allowlist" for f in findings]
        return _blocked(dict(folder=str(folder)), folder, None, [refusal(findings), *problems])
    try:
        layout = discover(input_folder)
    except CheckpointError as problem:
        return _blocked(dict(folder=str(folder)), folder, None, problem)
    try:
        _, info, fragments, params = build_index(input_folder, strict=strict, inject_missing_state=inject_missing_state)
    except CheckpointError as problem:
        return _blocked(layout_summary(layout), folder, layout, problem)
    assign_buckets(params, job_bytes=job_bytes, min_jobs=min_jobs)
    return conversion_tables(layout, info, fragments, params, hf_config)


def report_tables_job(index: IndexFiles, summary_path: str, plot_path: str) -> None:
    """The inspect tables and the bytes-per-parameter plot of the indexed checkpoint, for `snakemake --report`."""
    info = read_universal_info(index.info)
    record = read_index_record(index.layout, info)
    summary, tables = conversion_tables(record.layout, info, list(read_fragments(index.fragments)),
                                        read_parameters(index.params), record.hf_config_folder or "")
    write_inspection(summary, tables, Path(summary_path).parent)
    plot_parameter_bytes(tables["parameters"], plot_path)


def _blocked(summary, folder, layout, problem):
    """(summary, tables) of a checkpoint that cannot be converted: what is known, and the problem."""
    summary["blockers"] = [str(item) for item in problem] if isinstance(problem, list) else [str(problem)]
    tables = {
        "parameters": pd.DataFrame(columns=PARAMETER_COLUMNS),
        "experts": pd.DataFrame(columns=EXPERT_COLUMNS),
        "files": files_table(folder, layout),
        "args": _args_table(folder, layout),
    }
    return summary, tables


PARAMETER_COLUMNS = ["param", "shape", "dtype", "numel", "pp_stage", "tp_merge", "states", "bytes", "merge_job"]
EXPERT_COLUMNS = ["param", "moe_layer", "experts", "ep_size", "placement", "bytes"]


SVG_COLOURS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7"]


def plot_parameter_bytes(parameters: pd.DataFrame | None, path: Path | str, top: int = 40) -> None:
    """SVG bar chart of the largest parameters' universal bytes, coloured by merge job (written atomically)."""
    label_width, bar_width, row, head = 300, 460, 16, 40
    largest = parameters.sort_values("bytes", ascending=False).head(top) if parameters is not None else parameters
    if largest is None or not len(largest):
        write_text(path, '<svg xmlns="http://www.w3.org/2000/svg" width="400" height="40">'
                   '<text x="10" y="25" font-family="sans-serif" font-size="13">no parameters (see the summary)</text></svg>\n')
        return
    jobs = sorted(largest["merge_job"].unique())
    colour = {job: SVG_COLOURS[i % len(SVG_COLOURS)] for i, job in enumerate(jobs)}
    scale = bar_width / max(int(largest["bytes"].max()), 1)
    height = head + row * len(largest) + 20 + 16 * len(jobs)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + bar_width + 120}" height="{height}" '
        'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="20" font-size="14">Universal bytes of the largest {len(largest)} of {len(parameters)} parameters</text>',
    ]
    for index, (name, size, job) in enumerate(zip(largest["param"], largest["bytes"], largest["merge_job"])):
        y = head + index * row
        parts.append(f'<text x="{label_width - 6}" y="{y + 11}" text-anchor="end">{escape(str(name))}</text>')
        parts.append(f'<rect x="{label_width}" y="{y + 2}" width="{max(int(size) * scale, 1):.1f}" height="{row - 4}" '
                     f'fill="{colour[job]}"/>')
        parts.append(f'<text x="{label_width + int(size) * scale + 4:.1f}" y="{y + 11}">{int(size) / 2**20:.2f} MiB</text>')
    for index, job in enumerate(jobs):
        y = head + row * len(largest) + 12 + 16 * index
        parts.append(f'<rect x="{label_width}" y="{y}" width="10" height="10" fill="{colour[job]}"/>')
        parts.append(f'<text x="{label_width + 16}" y="{y + 9}">merge job {escape(str(job))}</text>')
    parts.append("</svg>")
    write_text(path, "\n".join(parts) + "\n")


def summary_text(summary: Mapping[str, Any]) -> str:
    lines = [f"Checkpoint {summary['folder']}"]
    if "zero_stage" in summary:
        lines.append(
            f"  ZeRO stage {summary['zero_stage']}, pp={summary['pp_degree']} tp={summary['tp_degree']} "
            f"dp={summary['dp_degree']}, {summary['rank_files']} optimizer files, iteration {summary['iteration']}"
        )
    if "parameters" in summary:
        lines.append(f"  {summary['parameters']} parameters, {summary['universal_bytes'] / 2**20:.1f} MiB of universal output")
    lines += [f"  {line}" for line in summary.get("exports") or ()]
    if "experts" in summary:
        lines.append(
            f"  AutoEP: {summary['moe_layers']} MoE layers of {summary['experts']} experts, ep={summary['ep_size']} "
            f"({summary['expert_placement']}), {summary['expert_bytes'] / 2**20:.1f} MiB of expert output"
        )
    if summary["blockers"]:
        lines.append("  Conversion is blocked:")
        lines += [f"    - {problem}" for problem in summary["blockers"]]
    else:
        lines.append("  Ready to convert.")
    return "\n".join(lines)


def write_inspection(summary: Mapping[str, Any], tables: Mapping[str, pd.DataFrame], folder: Path | str) -> None:
    folder = Path(folder)
    for name, table in tables.items():
        with atomic_writer(folder / f"{name}.csv") as handle:
            table.to_csv(handle, index=False)
        write_text(folder / f"{name}.md", markdown_table(table))
    summary_table = pd.DataFrame([(k, json.dumps(v) if isinstance(v, list) else v) for k, v in summary.items()],
                                 columns=["item", "value"])
    with atomic_writer(folder / "summary.csv") as handle:
        summary_table.to_csv(handle, index=False)
    write_text(folder / "summary.md", summary_text(summary) + "\n")


def describe(obj: object, indent: str = "", out: list[str] | None = None) -> list[str]:
    """Lines of a .pt file's key tree: containers expanded, tensors as dtype and shape."""
    out = [] if out is None else out
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, (dict, list, tuple)) and value:
                out.append(f"{indent}{key!s}: {type(value).__name__}[{len(value)}]")
                describe(value, indent + "  ", out)
            else:
                out.append(f"{indent}{key!s}: {_leaf(value)}")
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj[:MAX_LIST_ITEMS]):
            describe({f"[{index}]": value}, indent, out)
        if len(obj) > MAX_LIST_ITEMS:
            out.append(f"{indent}... {len(obj) - MAX_LIST_ITEMS} more")
    else:
        out.append(f"{indent}{_leaf(obj)}")
    return out


def _leaf(value):
    if isinstance(value, ptfile.TensorRef):
        return f"tensor {value.dtype} {list(value.shape)}"
    return bounded_repr(value, 120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ucpflow.inspect", description=__doc__.splitlines()[0])
    parser.add_argument("path", help="a .pt file (key tree) or a checkpoint folder (summary)")
    args = parser.parse_args(argv)
    try:
        if os.path.isdir(args.path) and is_run_folder(args.path):
            table, notes = runs_table(args.path)
            print(runs_text(args.path, table, notes), end="")
            return 0
        if os.path.isdir(args.path):
            summary, _ = inspect_checkpoint(args.path)
            print(summary_text(summary))
            return 1 if summary["blockers"] else 0
        findings = []
        print("\n".join(describe(ptfile.load(args.path, findings))))
        if findings:
            print(f"ucpflow error: {refusal(findings)}", file=sys.stderr)
        return 1 if findings else 0
    except UcpflowError as error:
        print(f"ucpflow error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
