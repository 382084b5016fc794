"""The saves of a training run folder, DeepSpeed's or the HF Trainer's, each with its state.

A DeepSpeed run folder holds one tag folder per save (`run/global_step100/`, `run/global_step200/`, ...) and
`run/latest` naming the newest finished one. The HF Trainer's output_dir holds `checkpoint-N/global_stepN/`
with a `latest` inside each checkpoint-N folder. Either way a save is a tag folder plus the folder holding
its `latest` (its *holder*: the run folder, or checkpoint-N).

A tag folder is a folder of a holder that its `latest` names, that holds DeepSpeed rank files
(`*_optim_states.pt`, `*model_states.pt`) at its top, or that is named `global_step<N>`; a universal
checkpoint (a folder holding `zero/`, or named `*_universal`) is not a save.

Each save's state, decided in this order:

* `being written`: a file of its tag folder (or the folder itself) was modified less than GROWING_SECONDS
  ago, or it is the newest save of the run (highest step) and its holder's `latest` does not name it yet
  (DeepSpeed writes `latest` after every rank's files, so until then the save is not finished);
* `incomplete`: DeepSpeed's file set fails ucpflow's discovery (`layout.discover`: a rank file missing,
  files of different steps, ...) or a `.pt` file of the tag folder is truncated (its zip directory, at the
  file's end, is unreadable); the reason is the first problem found;
* `complete` otherwise.

Only metadata is read: file sizes and times, each `.pt` file's zip directory, the model-state files' and the
first optimizer file's pickled structure (never tensor data).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import dsconst as C
from .. import ptfile
from ..errors import CheckpointError
from ..tables import Layout
from .layout import discover, natural_keys

COMPLETE = "complete"
BEING_WRITTEN = "being written"
INCOMPLETE = "incomplete"
# A save with a file modified this recently is taken to be still growing.
GROWING_SECONDS = 10.0
TRAINER_CHECKPOINT_PATTERN = r"checkpoint-(\d+)"
DEFAULT_TAG_PATTERN = r"global_step(\d+)"
UNIVERSAL_SUFFIX = "_universal"

# (phrase of a discovery sentence, the short reason a table shows), first match wins.
SHORT_REASONS = (
    ("truncated", "truncated file"),
    ("is missing", "rank file missing"),
    ("different checkpoints", "files of different steps"),
    ("no DeepSpeed optimizer files", "no optimizer files"),
    ("no ZeRO optimizer files", "no optimizer files"),
    ("model-state files", "model-state files do not match"),
    ("not a PyTorch checkpoint", "not a PyTorch file"),
    ("corrupt", "corrupt file"),
    ("outside ucpflow's allowlist", "untrusted global"),
    ("not supported", "not supported"),
)


@dataclass(frozen=True)
class Save:
    """One save of a run: its tag folder, the folder holding its `latest`, its size and state."""

    tag: str
    # The number in the tag's name (global_step200: 200); None for a tag without one.
    step: int | None
    folder: str
    holder: str
    bytes: int
    state: str
    # Why the save is not complete: a short phrase, and the full sentence ("" when complete).
    reason: str = ""
    detail: str = ""
    # What the files record, when discovery read them: the step (`iteration`, else `global_steps`) and dtype.
    recorded_step: int | None = None
    dtype: str = ""
    layout: Layout | None = field(default=None, compare=False, repr=False)

    @property
    def convertible(self) -> bool:
        return self.state == COMPLETE


def tag_step(tag: str) -> int | None:
    """The number in a tag's name: 200 for `global_step200`, the last number for other names, else None."""
    numbers = re.findall(r"\d+", tag)
    return int(numbers[-1]) if numbers else None


def has_rank_files(folder: Path | str) -> bool:
    """Whether `folder` holds DeepSpeed rank files at its top (a tag folder, not a folder of saves)."""
    return any(name.endswith((C.OPTIM_FILE_SUFFIX, C.MODEL_FILE_SUFFIX)) for name in _names(folder))


def _names(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _is_universal(folder):
    return folder.name.endswith(UNIVERSAL_SUFFIX) or (folder / "zero").is_dir()


def latest_tag(holder: Path | str) -> str | None:
    """The tag a holder's `latest` names, or None without a readable `latest`."""
    try:
        return (Path(holder) / C.LATEST_FILE).read_text().strip() or None
    except OSError:
        return None


def tag_folders(holder: Path | str) -> list[Path]:
    """The tag folders of one holder (a DeepSpeed run folder or a checkpoint-N folder), in natural order."""
    holder = Path(holder)
    named = latest_tag(holder)
    found = []
    for name in _names(holder):
        entry = holder / name
        if not entry.is_dir() or _is_universal(entry):
            continue
        if name == named or re.fullmatch(DEFAULT_TAG_PATTERN, name) or has_rank_files(entry):
            found.append(entry)
    return sorted(found, key=lambda entry: natural_keys(entry.name))


def _trainer_checkpoints(folder):
    return sorted((folder / name for name in _names(folder)
                   if re.fullmatch(TRAINER_CHECKPOINT_PATTERN, name) and (folder / name).is_dir()),
                  key=lambda entry: natural_keys(entry.name))


def is_trainer_output(folder: Path | str) -> bool:
    """Whether `folder` is the HF Trainer's output_dir: no `latest` or rank files of its own, and checkpoint-N
    folders holding a `latest` or a tag folder."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / C.LATEST_FILE).exists() or has_rank_files(folder):
        return False
    return any((entry / C.LATEST_FILE).is_file() or tag_folders(entry) for entry in _trainer_checkpoints(folder))


def holders(run_folder: Path | str) -> list[Path]:
    """The folders that hold the run's `latest` files: the checkpoint-N folders of an HF Trainer output_dir,
    else the run folder itself."""
    run_folder = Path(run_folder)
    return _trainer_checkpoints(run_folder) if is_trainer_output(run_folder) else [run_folder]


def is_run_folder(folder: Path | str) -> bool:
    """Whether `folder` holds a run's saves rather than one checkpoint: the HF Trainer's output_dir, or a
    folder with more than one tag folder. A tag folder, a checkpoint-N folder and a DeepSpeed folder with a
    single save are single checkpoints, read as before."""
    folder = Path(folder)
    if not folder.is_dir() or has_rank_files(folder):
        return False
    return is_trainer_output(folder) or len(tag_folders(folder)) > 1


def short_reason(sentence: str) -> str:
    """A few words for a table cell from a discovery sentence."""
    return next((short for phrase, short in SHORT_REASONS if phrase in sentence), "cannot be read")


def _files(folder):
    """[(path, stat)] of every file under `folder`."""
    found = []
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            try:
                found.append((path, os.stat(path)))
            except OSError:
                continue
    return found


def _metadata(layout):
    """(recorded step, dtype) from the first model-state file: the step is its `iteration`, else its
    `global_steps`; the dtype is bf16, fp16 or fp32 from the DeepSpeed config it records, else the dtype of its
    first module weight ("" when neither is there)."""
    state = ptfile.load(layout.model_files[0]) if layout.model_files else {}
    state = state if isinstance(state, dict) else {}
    step = state.get("iteration", state.get("global_steps"))
    config = state.get("ds_config")
    if isinstance(config, dict):
        enabled = [key for key in ("bf16", "fp16") if isinstance(config.get(key), dict) and config[key].get("enabled")]
        dtype = enabled[0] if enabled else "fp32"
    else:
        module = state.get("module")
        first = next(iter(module.values()), None) if isinstance(module, dict) and module else None
        dtype = str(getattr(first, "dtype", "") or "")
    return (int(step) if isinstance(step, int) else None), dtype


def read_save(folder: Path | str) -> tuple[Layout | None, int | None, str, str]:
    """(layout, recorded step, dtype, problem) of a tag folder: discovery's layout and the first model-state file's
    metadata, and the first reason the files do not make a whole DeepSpeed checkpoint ("" when they do):
    discovery's sentence, or a truncated `.pt` file's (the layout is kept then)."""
    try:
        layout = discover(folder)
        recorded, dtype = _metadata(layout)
    except CheckpointError as problem:
        return None, None, "", str(problem)
    except Exception as problem:  # noqa: BLE001 - one unreadable save is a row, never the whole listing's end
        return None, None, "", f"{folder} cannot be read ({type(problem).__name__}: {problem})."
    try:
        for path in sorted(Path(folder).glob("*.pt"), key=lambda entry: natural_keys(entry.name)):
            ptfile.check_container(path)
    except CheckpointError as problem:
        return layout, recorded, dtype, str(problem)
    return layout, recorded, dtype, ""


def _growing_reason(files, folder, now, growing_seconds):
    times = [stat.st_mtime for _, stat in files]
    try:
        times.append(os.stat(folder).st_mtime)
    except OSError:
        pass
    age = now - max(times) if times else growing_seconds
    return f"a file of {folder} was modified {max(age, 0):.0f} s ago" if age < growing_seconds else ""


def _unnamed_reason(holder, tag):
    named = latest_tag(holder)
    if named == tag:
        return ""
    if named is None:
        return f"it is the newest save and {holder} has no `latest` yet"
    return f"it is the newest save and {holder / C.LATEST_FILE} still names {named}"


def list_saves(run_folder: Path | str, now: float | None = None, growing_seconds: float = GROWING_SECONDS) -> list[Save]:
    """Every save of a run folder (a DeepSpeed save_dir, or the HF Trainer's output_dir), ordered by the step in
    its tag's name; see the module's docstring for the states (`now` and `growing_seconds` set the clock of the
    "modified recently" rule). A save that cannot be read is listed with its reason, never raised."""
    now = time.time() if now is None else now
    found = [(holder, tag) for holder in holders(run_folder) for tag in tag_folders(holder)]
    found.sort(key=lambda item: (_step_key(item[1].name), natural_keys(item[0].name), natural_keys(item[1].name)))
    saves = []
    for index, (holder, folder) in enumerate(found):
        files = _files(folder)
        common = dict(tag=folder.name, step=tag_step(folder.name), folder=str(folder), holder=str(holder),
                      bytes=sum(stat.st_size for _, stat in files))
        newest = index == len(found) - 1
        growing = _growing_reason(files, folder, now, growing_seconds) or (
            _unnamed_reason(holder, folder.name) if newest else "")
        layout, recorded, dtype, problem_text = read_save(folder)
        if growing:
            state, reason, detail = BEING_WRITTEN, "being written", f"being written: {growing}."
        elif problem_text:
            state, reason, detail = INCOMPLETE, short_reason(problem_text), problem_text
        else:
            state, reason, detail = COMPLETE, "", ""
        saves.append(Save(**common, state=state, reason=reason, detail=detail, recorded_step=recorded,
                          dtype=dtype, layout=layout))
    return saves


def _step_key(tag):
    step = tag_step(tag)
    return (0, -1) if step is None else (1, step)
