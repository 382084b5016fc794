"""Status words, report rows and the report files of `snakemake verify`: report.tsv, partitions.tsv and
summary.txt, and the one-sentence error of a failed verification."""

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_writer

OK = "ok"
MISMATCH = "mismatch"  # same keys, dtype and shape, elements differ or sit at other positions
WRONG_SHAPE = "wrong_shape"  # dtype or shape differs from what the index implies
WRONG_METADATA = "wrong_metadata"  # keys or metadata values (cat_dim, vocab_tensor, sub_param_shape, ...) differ
MISSING = "missing"
UNREADABLE = "unreadable"
UNEXPECTED = "unexpected"
TP_RANKS_DIFFER = "tp_ranks_differ"
NOT_CHECKED = "not_checked"
PASSING = {OK, NOT_CHECKED}

REPORT_COLUMNS = ["param", "state", "expected", "actual", "status"]
PARTITION_COLUMNS = ["file", "tensor", "numel", "fragments", "covered", "padding", "pipeline_copies", "problem"]


def row(param: str, state: str, expected: object, actual: object, status: str) -> dict[str, str]:
    return {"param": param, "state": state, "expected": str(expected), "actual": str(actual), "status": status}


def status_of(expected: object, actual: object) -> str:
    if actual in (MISSING, UNREADABLE):
        return actual
    return OK if str(expected) == str(actual) else MISMATCH


def summary(report: Sequence[Mapping[str, Any]], partitions: Sequence[Mapping[str, Any]], parameter_count: int) -> str:
    """One line: how many files matched, and whether the partitions were covered."""
    counts = {}
    for entry in report:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    covered = sum(1 for entry in partitions if not entry["problem"])
    details = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return (
        f"{parameter_count} parameters: {len(report)} checks ({details}); {covered} of {len(partitions)} flat "
        "optimizer tensors covered exactly once by the index (padding and pipeline copies aside)"
    )


def failure(report: Iterable[Mapping[str, Any]], partitions: Iterable[Mapping[str, Any]], log_path: Path | str,
            shown: int = 3) -> str | None:
    """The one-sentence error for a failed verification, or None when everything passed."""
    bad = [entry for entry in report if entry["status"] not in PASSING]
    bad_partitions = [entry for entry in partitions if entry["problem"]]
    if not bad and not bad_partitions:
        return None
    parts = []
    if bad:
        names = [f"{entry['param']} ({entry['state']}: {entry['status']})" for entry in bad]
        more = f" and {len(names) - shown} more" if len(names) > shown else ""
        parts.append(f"{', '.join(names[:shown])}{more}")
    if bad_partitions:
        first = bad_partitions[0]
        more = f" and {len(bad_partitions) - 1} more" if len(bad_partitions) > 1 else ""
        parts.append(f"{Path(first['file']).name} {first['tensor']}{more}, not covered exactly ({first['problem']})")
    return f"Verification failed for {'; '.join(parts)}; every failing check is listed in {log_path}."


def write_tsv(path: Path | str, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    with atomic_writer(path) as handle:
        handle.write("\t".join(columns) + "\n")
        for entry in rows:
            handle.write("\t".join(str(entry[c]).replace("\t", " ").replace("\n", " ") for c in columns) + "\n")
