"""The data that crosses job boundaries, defined once: the output folder's names, the checkpoint layout, and
the index's work tables as typed records, each written and read only here.

- `Layout` / `RankFile`: which files make up a checkpoint (found by `source.layout.discover`);
- `IndexRecord`: layout.json, the layout plus what the index derived from it (sources, buckets, …);
- `Fragment`: one row of fragments.tsv, the part of one parameter's state that one (pp, tp, dp) rank holds
  inside a flat optimizer tensor;
- `Parameter`: one row of params.tsv, one output parameter folder with its merge rule, format and size;
- `Located`: one row of an extraction map, where a flat tensor lies inside its source file.

Cells that hold structures (shapes, AutoEP plans) are JSON in the files and parsed here, once.
Nothing here imports pandas or torch: merge jobs read these tables.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from . import ptfile
from .errors import CheckpointError
from .fileio import atomic_writer, write_text

# The universal checkpoint's folder and file names (`ds_to_universal`'s layout).
ZERO = "zero"  # OUT/zero/<param>/<state>.pt and OUT/zero/optimizer_state.pt
STAGING = "tmp"  # OUT/tmp/<bucket>/: merge jobs' staging folders
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
MODEL_STATES_SUFFIX = "model_states.pt"
LATEST_UNIVERSAL = "latest_universal"
FP32_FILE = "fp32.pt"

# A parameter's states; a state's file is `<state>.pt`.
FP32 = "fp32"  # the state holding the weights themselves
OPTIMIZER_STATES = (FP32, "exp_avg", "exp_avg_sq")
STEP = "step"

# Output formats of a parameter folder, as DeepSpeed's converter writes them.
FORMAT_MERGED = "merged"  # {param, cat_dim, ...} dicts per state, plus step.pt (ZeRO-1/2, ZeRO-3 with TP)
FORMAT_FLAT = "flat"  # bare flat tensors (ZeRO-3 without TP)
FORMAT_MODULE = "module"  # only fp32.pt from the model weights (no optimizer state, e.g. frozen)
FORMAT_EXPERT = "expert"  # AutoEP fused experts: every EP rank's experts in one tensor, plus step.pt

# Kinds of source file an extraction maps.
KIND_ZERO12 = "zero12"
KIND_ZERO3 = "zero3"
KIND_MODEL = "model"

Shape = tuple  # of ints


def state_file(state: str) -> str:
    return f"{state}.pt"


def source_name(path: str) -> str:
    """The extraction target name of a source file: its file name without `.pt`."""
    return Path(path).name[: -len(".pt")]


def numel_of(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


class IndexFiles(NamedTuple):
    """The paths of what the index writes (the `index` rule's outputs of the same names)."""

    layout: str
    fragments: str
    params: str
    info: str


def index_files(folder: str) -> IndexFiles:
    """Where the index writes its files in `folder`."""
    return IndexFiles(f"{folder}/layout.json", f"{folder}/fragments.tsv", f"{folder}/params.tsv",
                      f"{folder}/universal_info.pkl")


# --- the checkpoint layout and layout.json ---------------------------------------------------------------


@dataclass(frozen=True)
class RankFile:
    """One optimizer-state file and the ranks whose ZeRO partition it holds."""

    path: str
    pp: int
    tp: int
    dp: int

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Layout:
    """A checkpoint's files and degrees, read from its file names and pickled metadata (never tensor data)."""

    folder: str
    zero_stage: int
    pp_degree: int
    tp_degree: int
    dp_degree: int
    rank_files: list[RankFile]
    model_files: list[str]
    copy_files: list[str]
    universal_info: dict | None
    global_steps: int = 0
    megatron_model: bool = False  # the first model-states file holds Megatron's `args`
    autoep_metadata: Any = None
    notes: list = field(default_factory=list)

    def rank_file(self, pp: int, tp: int, dp: int) -> RankFile:
        for rank in self.rank_files:
            if (rank.pp, rank.tp, rank.dp) == (pp, tp, dp):
                return rank
        raise KeyError((pp, tp, dp))


@dataclass(frozen=True)
class Source:
    """A file the merges read, and how its extraction maps it."""

    path: str
    kind: str


@dataclass
class IndexRecord:
    """layout.json: the indexed layout (its universal_checkpoint_info in its own file) and what the index
    derived from it for the later stages."""

    layout: Layout
    universal_info_file: str
    output_folder: str
    optimizer_state_source: str
    sources: dict[str, Source]  # {extraction name: source file}
    bucket_sources: dict[str, list[str]]  # {merge bucket: extraction names it reads}
    hf_config_folder: str | None  # the transformers config of the `hf` export, None for a Megatron model

    def source_path(self, name: str) -> str:
        return self.sources[name].path


def write_index_record(path: str, record: IndexRecord) -> None:
    flat = asdict(record.layout)
    flat.pop("universal_info")
    flat.update(
        universal_info_file=record.universal_info_file,
        output_folder=record.output_folder,
        optimizer_state_source=record.optimizer_state_source,
        sources={name: asdict(source) for name, source in record.sources.items()},
        bucket_sources=record.bucket_sources,
        hf_config_folder=record.hf_config_folder,
    )
    write_text(path, json.dumps(flat, indent=1))


def read_index_record(path: str, universal_info: dict | None = None) -> IndexRecord:
    """layout.json as an IndexRecord; the layout's universal_info is `universal_info` (read by the caller
    from `universal_info_file` when it needs it, through the restricted loader)."""
    try:
        flat = json.loads(Path(path).read_text())
        layout_names = {f.name for f in fields(Layout)} - {"universal_info", "rank_files"}
        layout = Layout(
            universal_info=universal_info,
            rank_files=[RankFile(**rank) for rank in flat["rank_files"]],
            **{key: value for key, value in flat.items() if key in layout_names},
        )
        return IndexRecord(
            layout=layout,
            universal_info_file=flat["universal_info_file"],
            output_folder=flat["output_folder"],
            optimizer_state_source=flat["optimizer_state_source"],
            sources={name: Source(**source) for name, source in flat["sources"].items()},
            bucket_sources=flat["bucket_sources"],
            hf_config_folder=flat["hf_config_folder"],
        )
    except (KeyError, TypeError, ValueError) as problem:
        raise CheckpointError(f"{path} is not an index written by this version of ucpflow ({problem}).")


def read_universal_info(path: str) -> dict:
    """The index's universal_checkpoint_info, read through the restricted loader like every input."""
    return ptfile.load(path)


# --- fragments.tsv ----------------------------------------------------------------------------------------


def shape_text(shape: Iterable[int] | None) -> str:
    return "" if shape is None else ",".join(str(int(d)) for d in shape)


def parse_shape(text: str) -> Shape:
    return tuple(int(d) for d in text.split(",")) if text else ()


@dataclass(frozen=True)
class Fragment:
    """The part of one parameter's `state` that rank (pp, tp, dp) holds: `numel` elements from `offset` of
    the flat tensor `tensor` of `file`; `shape` is the parameter's shape on that tensor-parallel rank."""

    param: str
    state: str
    tp: int
    pp: int
    dp: int
    file: str
    tensor: str
    offset: int
    numel: int
    shape: Shape = ()


FRAGMENT_COLUMNS = [f.name for f in fields(Fragment)]


def write_fragments(path: str, fragments: Iterable[Fragment]) -> None:
    with atomic_writer(path) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(FRAGMENT_COLUMNS)
        for f in fragments:
            writer.writerow([f.param, f.state, f.tp, f.pp, f.dp, f.file, f.tensor, f.offset, f.numel, shape_text(f.shape)])


def read_fragments(path: str) -> Iterator[Fragment]:
    with open(path, newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        if next(rows, None) != FRAGMENT_COLUMNS:
            raise CheckpointError(f"{path} is not a fragment table written by this version of ucpflow.")
        for param, state, tp, pp, dp, file, tensor, offset, numel, shape in rows:
            yield Fragment(param, state, int(tp), int(pp), int(dp), file, tensor, int(offset), int(numel),
                           parse_shape(shape))


# --- params.tsv -------------------------------------------------------------------------------------------


@dataclass
class Parameter:
    """One parameter folder of the universal checkpoint: how it is merged and what it holds.

    `shapes` has one entry per tensor-parallel rank (None where a rank holds none of it); `merge` is the
    tensor-parallel merge rule (patterns.py), "" for formats that have none; `source`/`tensor` locate the
    model weight of a FORMAT_MODULE parameter; `experts` is the AutoEP plan of a FORMAT_EXPERT one."""

    param: str
    format: str
    merge: str
    vocabulary: bool
    shapes: list
    states: tuple
    numel: int
    source: str = ""
    tensor: str = ""
    experts: dict | None = None
    bytes: int = 0
    bucket: str = ""

    def __post_init__(self):
        if not self.bytes:
            self.bytes = self.numel * 4 * sum(state in OPTIMIZER_STATES for state in self.states)

    @property
    def files(self) -> list[str]:
        """The file names of its universal folder."""
        return sorted(state_file(state) for state in self.states)


PARAMETER_COLUMNS = [f.name for f in fields(Parameter)]


def _parameter_cells(p: Parameter) -> list:
    shapes = json.dumps([list(s) if s is not None else None for s in p.shapes])
    experts = json.dumps(p.experts) if p.experts is not None else ""
    return [p.param, p.format, p.merge, p.vocabulary, shapes, ",".join(p.states), p.numel, p.source, p.tensor,
            experts, p.bytes, p.bucket]


def write_parameters(path: str, params: Iterable[Parameter]) -> None:
    with atomic_writer(path) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(PARAMETER_COLUMNS)
        writer.writerows(_parameter_cells(p) for p in params)


def _parameter(row: dict) -> Parameter:
    shapes = [tuple(s) if s is not None else None for s in json.loads(row["shapes"])]
    return Parameter(
        param=row["param"], format=row["format"], merge=row["merge"], vocabulary=row["vocabulary"] == "True",
        shapes=shapes, states=tuple(s for s in row["states"].split(",") if s), numel=int(row["numel"]),
        source=row["source"], tensor=row["tensor"], experts=json.loads(row["experts"]) if row["experts"] else None,
        bytes=int(row["bytes"]), bucket=row["bucket"],
    )


def read_parameters(path: str) -> list[Parameter]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if reader.fieldnames != PARAMETER_COLUMNS:
            raise CheckpointError(f"{path} is not a parameter table written by this version of ucpflow.")
        return [_parameter(row) for row in reader]


# --- extraction maps --------------------------------------------------------------------------------------


class Located(NamedTuple):
    """Where a flat tensor lies in its file (dtype, absolute byte offset, element count), or the plain
    `value` of a non-tensor entry (an Adam step)."""

    dtype: str | None
    byte_offset: int | None
    numel: int | None
    value: Any


EXTRACTION_COLUMNS = ["tensor", "dtype", "byte_offset", "numel", "value"]


def write_extraction(path: str, located: Iterable[tuple[str, Located]]) -> None:
    with atomic_writer(path) as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(EXTRACTION_COLUMNS)
        for key, where in located:
            if where.dtype is None:
                writer.writerow([key, "", "", "", json.dumps(where.value)])
            else:
                writer.writerow([key, where.dtype, where.byte_offset, where.numel, ""])


def read_extraction(path: str) -> dict[str, Located]:
    """{tensor key: Located} from an extraction map."""
    located = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            if row["dtype"]:
                located[row["tensor"]] = Located(row["dtype"], int(row["byte_offset"]), int(row["numel"]), None)
            else:
                located[row["tensor"]] = Located(None, None, None, json.loads(row["value"]))
    return located
