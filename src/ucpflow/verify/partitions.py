"""Partition coverage: in each rank file, the index's fragments of every flat optimizer tensor cover it
without overlap; what they leave uncovered must be DeepSpeed's padding (group padding at the end of a
partition, ZeRO-3's padding of each parameter's partition) or a pipeline stage's copy of a parameter
that the conversion takes from another stage."""

import math

from .. import dsconst as C
from .. import ptfile
from ..source.layout import ZERO_PARTITION_GROUPS
from ..tables import OPTIMIZER_STATES, STEP, Fragment, IndexRecord, Located, Parameter


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


def check_partitions(record: IndexRecord, fragments: list[Fragment], params: list[Parameter],
                     maps: dict[str, dict[str, Located]]) -> list[dict]:
    """One row per rank file and flat optimizer tensor: how the index's fragments cover it."""
    rows = []
    full_numel = {row.param: [math.prod(s) if s is not None else 0 for s in row.shapes] for row in params}
    by_tensor, stages = {}, {}
    for fragment in fragments:
        if fragment.state != STEP:
            by_tensor.setdefault((fragment.file, fragment.tensor), []).append(fragment)
            stages.setdefault((fragment.param, fragment.state, fragment.tp, fragment.dp), set()).add(fragment.pp)
    for rank in record.layout.rank_files:
        path = rank.path
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
                for name, address in _left_out_slices(optim, group, {f.param for f in listed}, record).items()
                if stages.get((name, state, rank.tp, rank.dp), set()) - {rank.pp}
            }
            intervals += [(start, start + count, name) for name, (start, count) in copies.items()]
            gaps, overlaps = _intervals_problem(intervals, numel)
            explained = _padding(record, optim, group, listed, full_numel, numel)
            unexplained = [gap for gap in gaps if not any(s <= gap[0] and gap[1] <= e for s, e in explained)]
            problems = overlaps + [f"elements [{a}, {b}) belong to no parameter" for a, b in unexplained]
            rows.append({
                "file": path, "tensor": tensor, "numel": numel, "fragments": len(listed),
                "covered": sum(f.numel for f in listed),
                "padding": sum(b - a for a, b in gaps) - sum(b - a for a, b in unexplained),
                "pipeline_copies": ",".join(sorted(copies)), "problem": "; ".join(problems),
            })  # fmt: skip
    return rows


def _left_out_slices(optim, group, indexed, record):
    """{name: (start, numel)} of ZeRO-1/2 slices in this file that the index leaves out. Copies of a
    parameter that several pipeline stages hold are left out on purpose: the conversion takes one stage's."""
    mappings = optim.get(C.PARAM_SLICE_MAPPINGS)
    if record.layout.zero_stage > 2 or not mappings or group >= len(mappings):
        return {}
    return {
        name: (int(address.start), int(address.numel))
        for name, address in mappings[group].items()
        if name not in indexed
    }


def _padding(record, optim, group, listed, full_numel, numel):
    """Intervals of a flat tensor that DeepSpeed fills with padding."""
    if record.layout.zero_stage > 2:
        # Each parameter's ZeRO-3 partition is ceil(numel / dp) elements; the last ranks' are padded.
        partition_groups = optim.get(ZERO_PARTITION_GROUPS) or []
        meta = partition_groups[group] if group < len(partition_groups) else {}
        count = int(meta.get("partition_count", record.layout.dp_degree))
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
