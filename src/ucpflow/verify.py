"""`snakemake verify`: check a universal checkpoint against its source, without torch or DeepSpeed.

For users who cannot run DeepSpeed's converter beside ucpflow, two checks account for every element of
every rank's optimizer partitions:

- partitions: in each rank file, the index's fragments of every flat optimizer tensor cover it without
  overlap; what they leave uncovered must be DeepSpeed's padding (group padding at the end of a
  partition, ZeRO-3's padding of each parameter's partition) or a pipeline stage's copy of a parameter
  that the conversion takes from another stage.
- parameters: per parameter and state, an order-independent checksum of the source elements (a sum of
  a mixing hash of each element's bits, mod 2^64, with the count and dtype) equals the same checksum
  over the universal tensor. Concatenating, reordering and splitting sub-parameters keep that multiset,
  so it holds for every tensor-parallel merge except: replicated parameters (the output is tp rank 0's,
  and the other ranks must be equal to it), averaged ones (compared with the recomputed mean), and
  vocabulary parameters (the padding rows beyond the original vocabulary size are left out). Steps are
  compared by value, model-weight fallbacks with the float32 conversion of the module tensor.
"""

import hashlib
import json
import math
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import dsconst as C
from . import ptfile
from .errors import CheckpointError, UcpflowError
from .autoep import universal_model_state_digest
from .index import FORMAT_MODULE, OPTIMIZER_STATES, STEP
from .layout import ZERO_PARTITION_GROUPS
from .jobs import LATEST_UNIVERSAL, OPTIMIZER_STATE_FILE, STAGING, ZERO, load_layout, read_fragments, read_table
from .patterns import AFFINE, AVERAGE, COLUMN_PARALLEL, REPLICATED, ROW_PARALLEL, classify

OK = "ok"
MISMATCH = "mismatch"
MISSING = "missing"
UNREADABLE = "unreadable"
UNEXPECTED = "unexpected"
TP_RANKS_DIFFER = "tp_ranks_differ"
NOT_CHECKED = "not_checked"
PASSING = {OK, NOT_CHECKED}

REPORT_COLUMNS = ["param", "state", "expected", "actual", "status"]
PARTITION_COLUMNS = ["file", "tensor", "numel", "fragments", "covered", "padding", "pipeline_copies", "problem"]

_MASK = (1 << 64) - 1
_CHUNK = 1 << 22
_SPLITMIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


@dataclass(frozen=True)
class Checksum:
    """Order-independent digest of a multiset of tensor elements."""

    dtype: str
    count: int = 0
    total: int = 0

    def __add__(self, other):
        if other.dtype != self.dtype:
            return Checksum(f"{self.dtype}+{other.dtype}", self.count + other.count, (self.total + other.total) & _MASK)
        return Checksum(self.dtype, self.count + other.count, (self.total + other.total) & _MASK)

    def __str__(self):
        return f"{self.dtype}:{self.count}:{self.total:016x}"


def _mixed_sum(bits):
    """Sum over elements of splitmix64(element bits), mod 2^64."""
    z = bits.astype(np.uint64) + _SPLITMIX[0]
    z = (z ^ (z >> np.uint64(30))) * _SPLITMIX[1]
    z = (z ^ (z >> np.uint64(27))) * _SPLITMIX[2]
    z ^= z >> np.uint64(31)
    return int(z.sum(dtype=np.uint64))


def checksum(array, dtype):
    """The checksum of a numpy array holding the raw elements of torch dtype `dtype`."""
    flat = np.ascontiguousarray(array).reshape(-1)
    bits = flat.view(f"u{flat.itemsize}")
    total = 0
    for start in range(0, bits.size, _CHUNK):
        total = (total + _mixed_sum(bits[start : start + _CHUNK])) & _MASK
    return Checksum(dtype, bits.size, total)


def tensor_checksum(tensor):
    """The checksum of a tensor of a checkpoint file, read in chunks."""
    if not tensor.is_contiguous:
        return checksum(tensor.read_array(), tensor.dtype)
    result = Checksum(tensor.dtype)
    for start in range(0, tensor.numel, _CHUNK):
        result = result + checksum(tensor.read(start, min(_CHUNK, tensor.numel - start)), tensor.dtype)
    return result


def _value_text(value):
    if isinstance(value, ptfile.TensorRef):
        value = ptfile.ArrayTensor(value.read_array(), value.dtype)
    if isinstance(value, ptfile.ArrayTensor):
        return f"{value.dtype}:{value.array.reshape(-1).tolist()}"
    return f"{type(value).__name__}:{value!r}"


def _row(param, state, expected, actual, status):
    return {"param": param, "state": state, "expected": str(expected), "actual": str(actual), "status": status}


class Universal:
    """Reads tensors from the universal checkpoint folder."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def load(self, param, state):
        """The file's structure, or the status word saying why there is none."""
        path = self.folder / ZERO / param / f"{state}.pt"
        if not path.is_file():
            return MISSING
        try:
            return ptfile.load(path)
        except (CheckpointError, ValueError):
            return UNREADABLE

    @staticmethod
    def tensor_of(structure):
        if isinstance(structure, dict):
            structure = structure.get(C.PARAM)
        return structure if isinstance(structure, ptfile.TensorRef) else None


class SourceSlices:
    """One state of one parameter in the source: its fragments, grouped by tensor-parallel rank."""

    def __init__(self, reader, fragments):
        self.reader = reader
        self.by_tp = {}
        for fragment in sorted(fragments, key=lambda f: (f.tp, f.dp)):
            self.by_tp.setdefault(fragment.tp, []).append(fragment)

    def dtype(self):
        first = next(iter(self.by_tp.values()))[0]
        return self.reader.locate(first.file, first.tensor)[0]

    def array(self, tp):
        """tp rank `tp`'s slice, concatenated over data-parallel ranks (flat)."""
        pieces = [self.reader.read(f.file, f.tensor, f.offset, f.numel)[0] for f in self.by_tp.get(tp, [])]
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=ptfile.numpy_dtype(self.dtype()))

    def checksum(self):
        """All elements of all tp ranks, read fragment by fragment."""
        dtype = self.dtype()
        result = Checksum(dtype)
        for fragments in self.by_tp.values():
            for f in fragments:
                for start in range(0, f.numel, _CHUNK):
                    data, _ = self.reader.read(f.file, f.tensor, f.offset + start, min(_CHUNK, f.numel - start))
                    result = result + checksum(data, dtype)
        return result


def _rows_kept(array, shape, vocab_size):
    """The first `vocab_size` rows of a flat slice of `shape` (DeepSpeed strips the vocabulary padding)."""
    if vocab_size is None:
        return array
    return array.reshape(shape)[:vocab_size]


def expected_state(slices, rule, shapes, vocab_size, tp_degree):
    """(expected checksum, status) of one merged state; status is TP_RANKS_DIFFER or NOT_CHECKED when
    the checksum alone cannot tell."""
    kind = rule.kind if rule else COLUMN_PARALLEL
    dtype = slices.dtype()
    if kind == AFFINE:
        return "affine rebuild: needs DeepSpeed", NOT_CHECKED
    if kind == REPLICATED:
        first = slices.array(0)
        for tp in range(1, tp_degree):
            if not np.array_equal(slices.array(tp), first):
                return f"tp rank {tp} differs from tp rank 0", TP_RANKS_DIFFER
        return checksum(_rows_kept(first, shapes[0], vocab_size), dtype), OK
    if kind == AVERAGE:
        total = 0
        for tp in range(tp_degree):
            total = total + slices.array(tp)
        mean = total / tp_degree
        return checksum(_rows_kept(mean, shapes[0], vocab_size), dtype), OK
    if vocab_size is None:
        return slices.checksum(), OK
    if kind == COLUMN_PARALLEL:
        # Slices are stacked along dim 0, so the rows kept are the first ones of the tp-ordered elements.
        merged = np.concatenate([slices.array(tp) for tp in range(tp_degree)])
        width = math.prod(shapes[0][1:])
        return checksum(merged[: vocab_size * width], dtype), OK
    if kind == ROW_PARALLEL:
        result = Checksum(dtype)
        for tp in range(tp_degree):
            result = result + checksum(_rows_kept(slices.array(tp), shapes[tp], vocab_size), dtype)
        return result, OK
    return f"vocabulary padding of a {kind} parameter", NOT_CHECKED


def verify_parameter(reader, universal, row, fragments, info, tp_degree):
    """Report rows for every state file of one parameter, and for files its folder should not hold."""
    param = row["param"]
    expected_files = {f"{state}.pt" for state in row["states"].split(",") if state}
    folder = universal.folder / ZERO / param
    present = sorted(os.listdir(folder)) if folder.is_dir() else []
    rows = [_row(param, name, "", "present", UNEXPECTED) for name in present if name not in expected_files]

    if row["format"] == FORMAT_MODULE:
        data, dtype = reader.read(row["source"], row["tensor"], 0, reader.locate(row["source"], row["tensor"])[2])
        as_float = ptfile.bfloat16_bits_to_float32(data) if dtype == "bfloat16" else data.astype(np.float32)
        rows.append(_compare(universal, param, "fp32", checksum(as_float, "float32"), OK))
        return rows

    by_state = {}
    for fragment in fragments:
        by_state.setdefault(fragment.state, []).append(fragment)
    rule = classify(info, param) if row["merge"] else None
    shapes = _shapes(row)
    vocab_size = info.get(C.ORIGINAL_VOCAB_SIZE) if rule is not None and rule.vocabulary else None
    if STEP in by_state:
        first = min(by_state[STEP], key=lambda f: (f.tp, f.dp))
        expected = _value_text(reader.value(first.file, first.tensor))
        structure = universal.load(param, STEP)
        actual = structure if structure in (MISSING, UNREADABLE) else _value_text(structure)
        rows.append(_row(param, STEP, expected, actual, _status(expected, actual)))
    for state in OPTIMIZER_STATES:
        if state not in by_state:
            continue
        slices = SourceSlices(reader, by_state[state])
        expected, status = expected_state(slices, rule, shapes, vocab_size, tp_degree)
        rows.append(_compare(universal, param, state, expected, status))
    return rows


def _status(expected, actual):
    if actual in (MISSING, UNREADABLE):
        return actual
    return OK if str(expected) == str(actual) else MISMATCH


def _compare(universal, param, state, expected, status):
    structure = universal.load(param, state)
    if structure in (MISSING, UNREADABLE):
        return _row(param, state, expected, structure, structure)
    tensor = universal.tensor_of(structure)
    actual = tensor_checksum(tensor) if tensor is not None else f"no tensor: {type(structure).__name__}"
    if status != OK:
        return _row(param, state, expected, actual, status)
    return _row(param, state, expected, actual, _status(expected, actual))


def _file_digest(path):
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return f"{os.path.getsize(path)}:{digest.hexdigest()}"


def _optimizer_state_status(path):
    if not path.is_file():
        return MISSING
    try:
        return OK if isinstance(ptfile.load(path), dict) else UNREADABLE
    except (CheckpointError, ValueError):
        return UNREADABLE


def verify_files(layout, output_folder, latest_path, param_names):
    """The universal checkpoint's other files: copied model states, optimizer_state.pt, latest_universal,
    and nothing else beside them."""
    output_folder = Path(output_folder)
    rows = []
    copies = {Path(path).name: path for path in layout["copy_files"]}
    for name, source in copies.items():
        target = output_folder / name
        actual = _file_digest(target) if target.is_file() else MISSING
        expected = universal_model_state_digest(source, _file_digest)  # AutoEP rewrites it
        rows.append(_row(name, "copy", expected, actual, _status(expected, actual)))
    status = _optimizer_state_status(output_folder / ZERO / OPTIMIZER_STATE_FILE)
    rows.append(_row(OPTIMIZER_STATE_FILE, "file", "a dict", "a dict" if status == OK else status, status))
    tag = output_folder.name
    actual = Path(latest_path).read_text() if Path(latest_path).is_file() else MISSING
    rows.append(_row(LATEST_UNIVERSAL, "tag", tag, actual, _status(tag, actual)))
    for entry in sorted(output_folder.iterdir()) if output_folder.is_dir() else []:
        if entry.name not in copies and entry.name not in (ZERO, STAGING):
            rows.append(_row(entry.name, "file", "", "present", UNEXPECTED))
    zero = output_folder / ZERO
    for entry in sorted(zero.iterdir()) if zero.is_dir() else []:
        if entry.name not in param_names and entry.name != OPTIMIZER_STATE_FILE:
            rows.append(_row(entry.name, "folder" if entry.is_dir() else "file", "", "present", UNEXPECTED))
    return rows


def _intervals_problem(intervals, numel):
    """Overlaps among (start, end, name) intervals and the gaps they leave in [0, numel)."""
    gaps, overlaps, position, previous = [], [], 0, None
    for start, end, name in sorted(intervals):
        if start < position:
            overlaps.append(f"{previous} and {name} overlap at element {start}")
        elif start > position:
            gaps.append((position, start))
        if end > position:
            position, previous = end, name
    if position < numel:
        gaps.append((position, numel))
    if position > numel:
        overlaps.append(f"{previous} runs past the end ({position} > {numel} elements)")
    return gaps, overlaps


def check_partitions(layout, fragments, params, maps):
    """One row per rank file and flat optimizer tensor: how the index's fragments cover it."""
    rows = []
    full_numel = {row["param"]: [math.prod(s) if s is not None else 0 for s in _shapes(row)] for row in params}
    by_tensor, stages = {}, {}
    for fragment in fragments:
        if fragment.state != STEP:
            by_tensor.setdefault((fragment.file, fragment.tensor), []).append(fragment)
            stages.setdefault((fragment.param, fragment.state, fragment.tp, fragment.dp), set()).add(fragment.pp)
    for rank in layout["rank_files"]:
        path = rank["path"]
        optim = ptfile.load(path).get(C.OPTIMIZER_STATE_DICT) or {}
        for tensor, (_, _, numel, _) in sorted(maps[path].items()):
            state = tensor.split("/")[0]
            if state not in OPTIMIZER_STATES:
                continue
            group = int(tensor.split("/")[1])
            listed = by_tensor.get((path, tensor), [])
            intervals = [(f.offset, f.offset + f.numel, f.param) for f in listed]
            copies = {
                name: address
                for name, address in _left_out_slices(optim, group, {f.param for f in listed}, layout).items()
                if stages.get((name, state, rank["tp"], rank["dp"]), set()) - {rank["pp"]}
            }
            intervals += [(start, start + count, name) for name, (start, count) in copies.items()]
            gaps, overlaps = _intervals_problem(intervals, numel)
            explained = _padding(layout, optim, group, listed, full_numel, numel)
            unexplained = [gap for gap in gaps if not any(s <= gap[0] and gap[1] <= e for s, e in explained)]
            problems = overlaps + [f"elements [{a}, {b}) belong to no parameter" for a, b in unexplained]
            rows.append({
                "file": path, "tensor": tensor, "numel": numel, "fragments": len(listed),
                "covered": sum(f.numel for f in listed),
                "padding": sum(b - a for a, b in gaps) - sum(b - a for a, b in unexplained),
                "pipeline_copies": ",".join(sorted(copies)), "problem": "; ".join(problems),
            })  # fmt: skip
    return rows


def _shapes(row):
    return [tuple(s) if s is not None else None for s in json.loads(row["shapes"])]


def _left_out_slices(optim, group, indexed, layout):
    """{name: (start, numel)} of ZeRO-1/2 slices in this file that the index leaves out. Copies of a
    parameter that several pipeline stages hold are left out on purpose: the conversion takes one stage's."""
    mappings = optim.get(C.PARAM_SLICE_MAPPINGS)
    if layout["zero_stage"] > 2 or not mappings or group >= len(mappings):
        return {}
    return {
        name: (int(address.start), int(address.numel))
        for name, address in mappings[group].items()
        if name not in indexed
    }


def _padding(layout, optim, group, listed, full_numel, numel):
    """Intervals of a flat tensor that DeepSpeed fills with padding."""
    if layout["zero_stage"] > 2:
        # Each parameter's ZeRO-3 partition is ceil(numel / dp) elements; the last ranks' are padded.
        partition_groups = optim.get(ZERO_PARTITION_GROUPS) or []
        meta = partition_groups[group] if group < len(partition_groups) else {}
        count = int(meta.get("partition_count", layout["dp_degree"]))
        padded = [(f.offset + f.numel, f.offset + math.ceil(full_numel[f.param][f.tp] / count)) for f in listed]
        end = max((b for _, b in padded), default=0)
        return padded + [(end, numel)]
    paddings = optim.get(C.GROUP_PADDINGS) or []
    padding = int(paddings[group]) if group < len(paddings) else 0
    explained = [(numel - padding, numel)] if padding else []
    alignment = optim.get("param_alignment_paddings") or []  # not recorded by older DeepSpeed versions
    if group < len(alignment) and any(alignment[group]):
        # Per-parameter alignment (round-robin gradients): any gap as wide as at most the largest padding.
        widest = max(alignment[group])
        explained += [(f.offset + f.numel, f.offset + f.numel + widest) for f in listed]
        explained += [(0, widest)]
    return explained


def _verify_bucket(task):
    """Worker: verify the parameters of one bucket (a process of its own when several run at once)."""
    from .extract import read_extraction
    from .merge import FragmentReader

    map_paths, output_folder, info_path, tp_degree, rows, fragments = task
    with open(info_path, "rb") as handle:
        info = pickle.load(handle)
    reader = FragmentReader({source: read_extraction(path) for source, path in map_paths.items()})
    universal = Universal(output_folder)
    by_param = {}
    for fragment in fragments:
        by_param.setdefault(fragment.param, []).append(fragment)
    try:
        report = []
        for row in rows:
            report += verify_parameter(reader, universal, row, by_param.get(row["param"], []), info, tp_degree)
        return report
    finally:
        reader.close()


def verify(layout_path, fragments_path, params_path, info_path, map_paths, output_folder, latest_path, workers=1):
    """(report rows, partition rows, number of parameters): the universal checkpoint checked against its source."""
    from .extract import read_extraction

    layout = load_layout(layout_path)
    params = read_table(params_path)
    fragments = list(read_fragments(fragments_path))
    sources = {Path(path).name[: -len(".tsv")]: path for path in map_paths}
    source_maps = {layout["sources"][name]["path"]: path for name, path in sources.items()}
    maps = {source: read_extraction(path) for source, path in source_maps.items()}
    partitions = check_partitions(layout, fragments, params, maps)

    by_bucket = {}
    for row in params:
        by_bucket.setdefault(row["bucket"], []).append(row)
    bucket_of = {row["param"]: row["bucket"] for row in params}
    fragments_by_bucket = {}
    for fragment in fragments:
        if fragment.param in bucket_of:
            fragments_by_bucket.setdefault(bucket_of[fragment.param], []).append(fragment)
    tasks = [
        (source_maps, output_folder, info_path, layout["tp_degree"], rows, fragments_by_bucket.get(bucket, []))
        for bucket, rows in sorted(by_bucket.items())
    ]
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            results = list(pool.map(_verify_bucket, tasks))
    else:
        results = [_verify_bucket(task) for task in tasks]
    report = [row for rows in results for row in rows]
    report += verify_files(layout, output_folder, latest_path, set(bucket_of))
    return report, partitions, len(params)


def summary(report, partitions, parameter_count):
    """One line: how many files matched, and whether the partitions were covered."""
    counts = {}
    for row in report:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    covered = sum(1 for row in partitions if not row["problem"])
    details = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return (
        f"{parameter_count} parameters: {len(report)} checks ({details}); {covered} of {len(partitions)} flat "
        "optimizer tensors covered exactly once by the index (padding and pipeline copies aside)"
    )


def failure(report, partitions, log_path, shown=3):
    """The one-sentence error for a failed verification, or None when everything passed."""
    bad = [row for row in report if row["status"] not in PASSING]
    bad_partitions = [row for row in partitions if row["problem"]]
    if not bad and not bad_partitions:
        return None
    parts = []
    if bad:
        names = [f"{row['param']} ({row['state']}: {row['status']})" for row in bad]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{', '.join(names[:shown])}{more}")
    if bad_partitions:
        first = bad_partitions[0]
        more = f" and {len(bad_partitions) - 1} more" if len(bad_partitions) > 1 else ""
        parts.append(f"{Path(first['file']).name} {first['tensor']}{more}, not covered exactly ({first['problem']})")
    return f"Verification failed for {'; '.join(parts)}; every failing check is listed in {log_path}."


def write_tsv(path, columns, rows):
    from .fileio import atomic_writer

    with atomic_writer(path) as handle:
        handle.write("\t".join(columns) + "\n")
        for row in rows:
            handle.write("\t".join(str(row[c]).replace("\t", " ").replace("\n", " ") for c in columns) + "\n")


def verify_job(inputs, output_folder, latest_path, outputs, log_path, workers):
    """Rule `verify`: write the report and summary; fail with one sentence when anything is off."""
    from .fileio import write_text

    report, partitions, parameter_count = verify(
        inputs["layout"], inputs["fragments"], inputs["params"], inputs["info"], inputs["maps"],
        output_folder, latest_path, workers=workers,
    )  # fmt: skip
    line = summary(report, partitions, parameter_count)
    print(line)
    error = failure(report, partitions, log_path)
    if error:
        for row in report:
            if row["status"] not in PASSING:
                print("\t".join(str(row[c]) for c in REPORT_COLUMNS))
        for row in partitions:
            if row["problem"]:
                print(f"{row['file']}\t{row['tensor']}\t{row['problem']}")
        raise UcpflowError(error)
    write_tsv(outputs["partitions"], PARTITION_COLUMNS, partitions)
    write_tsv(outputs["report"], REPORT_COLUMNS, report)
    write_text(outputs["summary"], line + "\n")
    return line
