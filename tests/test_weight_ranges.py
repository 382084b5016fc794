"""The hf export copies a weight's bytes straight from the rank files (the kernel's copy_file_range) where
they are exactly the merged fp32 weight: on real DeepSpeed checkpoints, those byte ranges hold the bytes
that the merge computes, and a weight that needs more than laying fragments end to end gets none."""

import os

import numpy as np
import pytest
from test_megatron_universal import LAYOUTS as MEGATRON_CASES
from test_zero_universal import CASES as ZERO_CASES

from ucpflow.source.fragments import build_index
from ucpflow.source.patterns import classify
from ucpflow.stages.extract import FragmentReader, extraction_rows
from ucpflow.stages.index import source_kinds
from ucpflow.stages.merge import merged_weight, weight_file_ranges


def range_bytes(ranges):
    pieces = []
    for path, offset, nbytes in ranges:
        with open(path, "rb") as handle:
            handle.seek(offset)
            pieces.append(handle.read(nbytes))
    return b"".join(pieces)


def weights_and_ranges(tag):
    """{param: (merged weight's bytes, its dtype, byte ranges or None, index row)} of every parameter."""
    layout, info, fragments, params = build_index(str(tag))
    maps = {source.path: dict(extraction_rows(source.path, source.kind))
            for source in source_kinds(layout, params).values()}
    reader = FragmentReader(maps)
    found = {}
    try:
        for row in params:
            frags = [frag for frag in fragments if frag.param == row.param]
            rule = classify(info, row.param) if row.merge else None
            array, dtype = merged_weight(reader, row, frags, rule, info, layout.tp_degree)
            found[row.param] = (np.ascontiguousarray(array).tobytes(), dtype,
                                weight_file_ranges(reader, row, frags, rule, layout.tp_degree), row)
            reader.release()
    finally:
        reader.close()
    return found


@pytest.mark.parametrize("case", ["z1_bf16_dp2", "z1_bf16_dp3_odd", "z2_bf16_frozen", "z3_fp32_dp3_odd", "t1p2d2"])
def test_byte_ranges_hold_the_merged_weight(case, deepspeed_checkpoint, megatron_checkpoint):
    if case in MEGATRON_CASES:
        found = weights_and_ranges(megatron_checkpoint(case, **MEGATRON_CASES[case]))
    else:
        found = weights_and_ranges(deepspeed_checkpoint(case, **ZERO_CASES[case]))
    # Every weight is whole in the ranges, except those taken from the model weights (a frozen or tied one
    # at ZeRO-1/2) and Megatron's padded vocabulary (trimmed).
    expected = {name for name, (*_, row) in found.items() if row.format != "module" and not row.vocabulary}
    assert expected and {name for name, value in found.items() if value[2] is not None} == expected
    for name in expected:
        merged, dtype, (ranges, range_dtype), _ = found[name]
        assert range_dtype == dtype, name
        assert range_bytes(ranges) == merged, name
    if case == "t1p2d2":
        assert found["tied_modules.embed.word_embeddings.weight"][3].vocabulary


def test_tensor_parallel_weights_have_no_ranges(megatron_checkpoint):
    found = weights_and_ranges(megatron_checkpoint("t2p1d2", **MEGATRON_CASES["t2p1d2"]))
    assert found and all(value[2] is None for value in found.values())


def test_a_fragment_past_the_end_of_its_file_is_a_checkpoint_error(deepspeed_checkpoint, tmp_path):
    from ucpflow.errors import CheckpointError

    tag = deepspeed_checkpoint("z1_bf16_dp2", **ZERO_CASES["z1_bf16_dp2"])
    layout, info, fragments, params = build_index(str(tag))
    maps = {source.path: dict(extraction_rows(source.path, source.kind))
            for source in source_kinds(layout, params).values()}
    last = max(fragments, key=lambda frag: maps[frag.file][frag.tensor].byte_offset)
    cut = tmp_path / os.path.basename(last.file)
    cut.write_bytes(open(last.file, "rb").read()[: maps[last.file][last.tensor].byte_offset + 4])
    reader = FragmentReader({str(cut): maps[last.file]})
    with pytest.raises(CheckpointError, match="truncated"):
        reader.byte_range(str(cut), last.tensor, last.offset, last.numel)
