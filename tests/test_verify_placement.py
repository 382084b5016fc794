"""Fast tier: for every merge rule, verify's position map (`ucpflow.verify.placement`) places each source
element where the merge puts it. Random per-rank slices are merged by `ucpflow.stages.merge.merge_state` (tested
against ds_to_universal elsewhere; affine maps by DeepSpeed's own rebuild), and the position checksum of the
slices must equal that of the merged tensor, with the same shape and metadata keys; a slice from the wrong
rank, or a merged tensor permuted, must not."""

import math

import numpy as np
import pytest

from ucpflow import dsconst as C
from ucpflow.source.patterns import classify
from ucpflow.stages.merge import Slice, merge_state
from ucpflow.tables import FORMAT_MERGED, OPTIMIZER_STATES, Parameter
from ucpflow.verify.digest import Checksum, run_sum, structure_text
from ucpflow.verify.parameters import placed_checksum
from ucpflow.verify.placement import geometry

NAME = "layer.weight"
SUBPARAMS = {"patterns": [NAME], "shape": ((8, 4, 4), 6), "partition_dim": 0}
CASES = {
    # name: (universal_checkpoint_info, per-rank shapes)
    "column_parallel": ({}, [[5, 4], [3, 4]]),
    "column_parallel_1d": ({}, [[6], [6]]),
    "row_parallel_3d_uneven": ({C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [NAME]}, [[4, 3, 2], [4, 5, 2]]),
    "vocabulary": ({C.VOCABULARY_PARAMETER_PATTERNS: [NAME], C.ORIGINAL_VOCAB_SIZE: 13}, [[8, 4], [8, 4]]),
    "vocabulary_row_parallel": ({C.VOCABULARY_PARAMETER_PATTERNS: [NAME], C.ORIGINAL_VOCAB_SIZE: 7,
                                 C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [NAME]}, [[10, 3], [10, 2]]),
    "two_sub_params": ({C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0: [NAME]}, [[5, 4], [5, 4]]),
    "replicated": ({C.TP_REPLICATED_PARAMETER_PATTERNS: [NAME]}, [[3, 4], [3, 4]]),
    "sub_params_uneven_widths": ({C.UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.4, C.PARAMETER_WITH_SUB_PARAMS: [SUBPARAMS],
                                  C.SUB_PARAM_SHARD_WIDTHS: {NAME: [[5, 3], [2, 2], [1, 3]]}}, [[8, 6], [8, 6]]),
    "sub_params_legacy_count": ({C.PARAMETER_WITH_SUB_PARAMS: [{"patterns": [NAME], "shape": (3, -1),
                                                                "partition_dim": 0}]}, [[6, 5], [6, 5]]),
}  # fmt: skip


def _slices(shapes, replicated=False):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    return [Slice(arrays[0] if replicated else array, "float32") for array in arrays]


def _place(info, shapes, slices, state="fp32"):
    rule = classify(info, NAME)
    row = Parameter(param=NAME, format=FORMAT_MERGED, merge=rule.kind, vocabulary=rule.vocabulary,
                    shapes=[tuple(shape) for shape in shapes], states=OPTIMIZER_STATES, numel=sum(map(math.prod, shapes)))
    shape_geometry = geometry(row, rule, info, len(shapes), state)
    total = Checksum()
    for tp, piece in enumerate(slices):
        if tp in shape_geometry.runs:
            total = total + placed_checksum(shape_geometry, tp, 0, piece.array.reshape(-1))
    return shape_geometry, total


def _keys(entries):
    return tuple(k if k == C.PARAM else f"{k}={structure_text(v)}" for k, v in entries.items())


def _check(info, shapes, slices):
    entries = merge_state(NAME, classify(info, NAME), "fp32", slices, info, len(shapes))
    merged = entries[C.PARAM].array
    shape_geometry, placed = _place(info, shapes, slices)
    assert shape_geometry.shape == merged.shape
    assert shape_geometry.keys == _keys(entries)
    assert placed == run_sum(0, merged)
    return merged, placed


@pytest.mark.parametrize("case", sorted(CASES))
def test_positions_follow_the_merge(case):
    info, shapes = CASES[case]
    merged, placed = _check(info, shapes, _slices(shapes, replicated=case == "replicated"))

    # The same elements in another order do not pass: the merged tensor's halves swapped ...
    flat = merged.reshape(-1)
    half = flat.size // 2
    assert run_sum(0, np.concatenate([flat[half:], flat[:half]])) != placed
    # ... nor the tensor-parallel ranks' slices exchanged (for equal shapes), except where tp rank 0 is the output.
    if shapes[0] == shapes[1] and case != "replicated":
        swapped = _slices(shapes)[::-1]
        assert _place(info, shapes, swapped)[1] != placed


def _affine_info(affine_map, vocab=None):
    info = {C.AFFINE_MAP: {C.AFFINE_MAP_PARAMS: {NAME: affine_map.to_dict()}}}
    if vocab:
        info.update({C.VOCABULARY_PARAMETER_PATTERNS: [NAME], C.ORIGINAL_VOCAB_SIZE: vocab})
    return info


def test_affine_maps_place_elements_as_deepspeed_rebuilds_them():
    affine = pytest.importorskip("deepspeed.checkpoint.affine")
    maps = [
        (affine.contiguous_split_map((4, 6), [2, 4], 1), None),
        (affine.sub_param_map((16, 3), (8, 4, 4), [[5, 3], [2, 2], [1, 3]], 0), None),
        (affine.contiguous_split_map((12, 4), [7, 5], 0), 10),
        (affine.replicated_map((5, 3), 2, scale=0.3), None),
        (affine.replicated_map((7,), 2), None),
    ]
    for affine_map, vocab in maps:
        info = _affine_info(affine_map, vocab)
        shapes = [list(affine_map.shard_shapes[rank]) for rank in sorted(affine_map.shard_shapes)]
        replicated = len(affine_map.pieces_by_rank[0][0].locations) > 1
        merged, placed = _check(info, shapes, _slices(shapes, replicated))
        assert run_sum(0, merged.reshape(-1)[::-1].copy()) != placed
