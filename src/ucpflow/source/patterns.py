"""How each parameter's tensor-parallel slices are merged, decided from `universal_checkpoint_info`.

This reproduces the pattern matching of DeepSpeed's `merge_tp_slices`: `re.match` against each
category's patterns, at most one match per category, categories tried in DeepSpeed's order, and a
pattern counts as used only when DeepSpeed's code path would have consulted it.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import dsconst as C
from ..errors import CheckpointError

REPLICATED = "replicated"
AVERAGE = "average"
TWO_SUB_PARAMS = "two_sub_params"
SUB_PARAMS = "sub_params"
ROW_PARALLEL = "row_parallel"
COLUMN_PARALLEL = "column_parallel"
AFFINE = "affine"

CATEGORY_KEYS = (
    C.TP_REPLICATED_PARAMETER_PATTERNS,
    C.PARAMETER_TO_AVERAGE_PATTERNS,
    C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
    C.VOCABULARY_PARAMETER_PATTERNS,
    C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0,
)


@dataclass(frozen=True)
class MergeRule:
    """How one parameter is merged across tensor-parallel ranks."""

    kind: str
    vocabulary: bool
    pattern: str = None
    sub_params: dict = None
    consumed: frozenset = frozenset()


def _field(entry, key):
    return entry[key] if isinstance(entry, dict) else getattr(entry, key)


def sub_param_entries(info: Mapping[str, Any]) -> list[Any]:
    return list(info.get(C.PARAMETER_WITH_SUB_PARAMS, []) or [])


def all_patterns(info: Mapping[str, Any]) -> set[str]:
    patterns = set()
    for key in CATEGORY_KEYS:
        patterns.update(info.get(key, []) or [])
    for entry in sub_param_entries(info):
        patterns.update(_field(entry, "patterns"))
    return patterns


def _single_match(patterns, name):
    matched = [pattern for pattern in patterns or [] if re.match(pattern, name)]
    if len(matched) > 1:
        raise CheckpointError(f"Parameter {name} matches more than one pattern of the same kind: {matched}.")
    return matched[0] if matched else None


def _sub_params_match(info, name):
    for entry in sub_param_entries(info):
        for pattern in _field(entry, "patterns"):
            if re.match(pattern, name):
                return entry, pattern
    return None, None


def affine_pattern(info: Mapping[str, Any], name: str) -> str | None:
    params = (info.get(C.AFFINE_MAP) or {}).get(C.AFFINE_MAP_PARAMS, {}) or {}
    return _single_match(list(params), name)


def classify(info: Mapping[str, Any], name: str, has_slices: bool = True) -> MergeRule:
    """The MergeRule DeepSpeed would apply to `name`, with the patterns its code path consumes."""
    consumed = set()
    sub_entry, sub_pattern = _sub_params_match(info, name)
    if sub_pattern:
        consumed.add(sub_pattern)
    vocab = _single_match(info.get(C.VOCABULARY_PARAMETER_PATTERNS), name)
    if vocab:
        consumed.add(vocab)

    if affine_pattern(info, name):
        for key in CATEGORY_KEYS:
            matched = _single_match(info.get(key), name)
            if matched:
                consumed.add(matched)
        return MergeRule(AFFINE, bool(vocab), affine_pattern(info, name), consumed=frozenset(consumed))

    for key, kind in (
        (C.TP_REPLICATED_PARAMETER_PATTERNS, REPLICATED),
        (C.PARAMETER_TO_AVERAGE_PATTERNS, AVERAGE),
        (C.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0, TWO_SUB_PARAMS),
    ):
        matched = _single_match(info.get(key), name)
        if matched:
            consumed.add(matched)
            return MergeRule(kind, bool(vocab), matched, consumed=frozenset(consumed))
    if sub_entry is not None:
        return MergeRule(SUB_PARAMS, bool(vocab), sub_pattern, sub_params=sub_entry, consumed=frozenset(consumed))
    if not has_slices:
        # DeepSpeed skips a parameter without optimizer slices before it looks at the vocabulary patterns.
        return MergeRule(COLUMN_PARALLEL, False, consumed=frozenset(consumed - {vocab}))
    row = _single_match(info.get(C.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS), name)
    if row:
        consumed.add(row)
        return MergeRule(ROW_PARALLEL, bool(vocab), row, consumed=frozenset(consumed))
    return MergeRule(COLUMN_PARALLEL, bool(vocab), consumed=frozenset(consumed))


def unused_patterns(info: Mapping[str, Any], rules: Iterable[MergeRule]) -> list[str]:
    used = set()
    for rule in rules:
        used |= rule.consumed
    return sorted(all_patterns(info) - used)
