"""What the jobs of several stages share: the names of the output's folders and files, and readers of
the index's tables, layout and universal_checkpoint_info."""

import collections
import csv
import json
from pathlib import Path

from ..errors import CheckpointError

STAGING = "tmp"
ZERO = "zero"
OPTIMIZER_STATE_FILE = "optimizer_state.pt"
MODEL_STATES_SUFFIX = "model_states.pt"


def source_name(path):
    """The extraction target name of a source file: its file name without `.pt`."""
    return Path(path).name[: -len(".pt")]


def load_layout(path):
    with open(path) as handle:
        return json.load(handle)


def load_universal_info(path):
    """The index's universal_checkpoint_info, read through the restricted loader like every input."""
    from ..ptfile import load

    return load(path)


def read_table(path):
    """Rows of a TSV index table as dicts of strings (merge jobs read them without importing pandas)."""
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


Fragment = collections.namedtuple("Fragment", "param state tp pp dp file tensor offset numel shape")


def read_fragments(path):
    with open(path, newline="") as handle:
        rows = csv.reader(handle, delimiter="\t")
        if next(rows) != list(Fragment._fields):
            raise CheckpointError(f"{path} is not a fragment table written by this version of ucpflow.")
        for param, state, tp, pp, dp, file, tensor, offset, numel, shape in rows:
            yield Fragment(param, state, int(tp), int(pp), int(dp), file, tensor, int(offset), int(numel), shape)
