"""What a training run folder holds: one row per save (step, state, degrees, size, whether it can be
converted, what is already converted for it), read from metadata and the outputs' completion markers.

    python -m ucpflow.inspect RUN_FOLDER
    snakemake --cores 1 inspect --config input_folder=RUN_FOLDER     # also runs.md and runs.csv
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .console import human_size
from .export.megatron import TRACKER_FILE
from .fileio import atomic_writer, write_text
from .markdown import markdown_table
from .markers import folder_beside, latest_universal_path, save_folders, universal_folder_of
from .source.hfconfig import CONFIG_FILE
from .source.saves import BEING_WRITTEN, COMPLETE, INCOMPLETE, Save, latest_tag, list_saves
from .tables import FP32_FILE, OPTIMIZER_STATE_FILE, STAGING, ZERO


# What a run folder's inspect writes: runs.csv holds every column, runs.md and the printed table the first ones.
RUN_TABLE_COLUMNS = ["step", "save", "state", "zero", "dp", "tp", "pp", "dtype", "size", "convertible", "converted"]
RUN_COLUMNS = RUN_TABLE_COLUMNS + ["tag", "recorded_step", "bytes", "reason", "folder", "universal_folder"]
NOTHING = "none"


@dataclass(frozen=True)
class OutputFolders:
    """The config's output folder keys ("" when unset) and the save the other targets convert (the one the run
    folder's `latest` names; "" for an HF Trainer output_dir), to which a set `output_folder` belongs. With
    `per_save` (the config chooses saves with `tags`), the folders are the roots of every save's folders."""

    output_folder: str = ""
    hf_folder: str = ""
    megatron_folder: str = ""
    reshard_folder: str = ""
    converted_save: str = ""
    per_save: bool = False

    def of(self, save: Save) -> dict[str, str]:
        """{target: folder} that a conversion of `save` writes with this config: with `per_save`, the save's
        folders in the roots (markers.save_folders); else `<tag>_universal` beside the tag folder (or the set
        output_folder, for the save the other targets convert), hf, megatron and reshard beside that unless
        their keys are set."""
        if self.per_save:
            return save_folders(self.output_folder, self.hf_folder, self.megatron_folder, self.reshard_folder,
                                save.tag)
        same = self.converted_save and os.path.normpath(save.folder) == os.path.normpath(self.converted_save)
        universal = self.output_folder if self.output_folder and same else universal_folder_of(save.folder)
        return dict(
            universal=universal,
            hf=self.hf_folder or folder_beside(universal, "hf"),
            megatron=self.megatron_folder or folder_beside(universal, "megatron"),
            reshard=self.reshard_folder or folder_beside(universal, "reshard"),
        )


def _read(path):
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def universal_state(folder: Path | str, save: Save, per_save: bool = False) -> str:
    """"universal" when the parent's latest_universal names `folder` (written last, so the folder is complete);
    "universal (unmarked)" when it names another conversion but every file finalize checks for is here (an
    earlier conversion beside a later one: latest_universal marks only the last), or just "universal" when
    `per_save` (each of a run's saves converted into its own folder, latest_universal naming the newest);
    "universal (partial)" when files are missing or staging is left; "" without the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return ""
    if _read(latest_universal_path(str(folder))) == folder.name:
        return "universal"
    zero = folder / ZERO
    parameters = [entry for entry in zero.iterdir() if entry.is_dir()] if zero.is_dir() else []
    copies = [os.path.basename(path) for path in (save.layout.copy_files if save.layout else [])]
    whole = (parameters and (zero / OPTIMIZER_STATE_FILE).is_file() and not (folder / STAGING).exists()
             and all((entry / FP32_FILE).is_file() for entry in parameters)
             and all((folder / name).is_file() for name in copies))
    if not whole:
        return "universal (partial)"
    return "universal" if per_save else "universal (unmarked)"


def converted_outputs(save: Save, folders: Mapping[str, str], shared_hf: bool, per_save: bool = False) -> list[str]:
    """What is already converted for `save`, read from each output's completion marker: the universal
    checkpoint (see universal_state), a Megatron export whose tracker names the save's recorded step, a
    reshard whose `latest` names its tag, and a transformers export (config.json, written last) when its
    folder belongs to this save alone (a shared hf folder does not record its source save)."""
    found = [universal_state(folders["universal"], save, per_save)]
    if save.recorded_step is not None and _read(Path(folders["megatron"]) / TRACKER_FILE) == str(save.recorded_step):
        found.append("megatron")
    if latest_tag(folders["reshard"]) == save.tag and (Path(folders["reshard"]) / save.tag).is_dir():
        found.append("reshard")
    if not shared_hf and (Path(folders["hf"]) / CONFIG_FILE).is_file():
        found.append("hf")
    return [item for item in found if item]


def runs_table(run_folder: Path | str, output_folders: OutputFolders = OutputFolders(),
               now: float | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(one row per save of the run folder, notes): step, save, state, degrees, dtype, size, whether it can be
    converted (or why not, in a few words) and what is already converted for it; the notes give the full
    reason of each save that cannot be converted and what the table cannot tell."""
    run_folder = Path(run_folder)
    saves = list_saves(run_folder, now=now)
    folders = [output_folders.of(save) for save in saves]
    hf_users = Counter(os.path.normpath(entry["hf"]) for entry in folders)
    rows, notes = [], []
    for save, where in zip(saves, folders):
        layout = save.layout
        shared_hf = hf_users[os.path.normpath(where["hf"])] > 1
        converted = converted_outputs(save, where, shared_hf, output_folders.per_save)
        rows.append(dict(
            step="" if save.step is None else save.step,
            save=os.path.relpath(save.folder, run_folder),
            state=save.state,
            zero=layout.zero_stage if layout else "",
            dp=layout.dp_degree if layout else "",
            tp=layout.tp_degree if layout else "",
            pp=layout.pp_degree if layout else "",
            dtype=save.dtype,
            size=human_size(save.bytes),
            convertible="yes" if save.convertible else f"no: {save.reason}",
            converted=", ".join(converted) or NOTHING,
            tag=save.tag,
            recorded_step="" if save.recorded_step is None else save.recorded_step,
            bytes=save.bytes,
            reason=save.detail,
            folder=save.folder,
            universal_folder=where["universal"],
        ))
        if save.detail:
            notes.append(f"{os.path.relpath(save.folder, run_folder)}: {save.detail}")
        if save.step is not None and save.recorded_step is not None and save.step != save.recorded_step:
            notes.append(f"{os.path.relpath(save.folder, run_folder)}: its tag says step {save.step}, but its "
                         f"model-state files record step {save.recorded_step}.")
    shared = sorted({where["hf"] for where in folders if hf_users[os.path.normpath(where["hf"])] > 1
                     and (Path(where["hf"]) / CONFIG_FILE).is_file()})
    notes += [f"{folder} holds a transformers export; which save it came from is not recorded." for folder in shared]
    return pd.DataFrame(rows, columns=RUN_COLUMNS), notes


def runs_text(run_folder: Path | str, table: pd.DataFrame, notes: Sequence[str]) -> str:
    """The printed and runs.md form: a count line, the table's main columns, then the notes."""
    counts = Counter(table["state"])
    parts = [f"{counts[state]} {state}" for state in (COMPLETE, BEING_WRITTEN, INCOMPLETE) if counts[state]]
    lines = [f"Run folder {run_folder}: {len(table)} saves ({', '.join(parts) or 'none found'})", ""]
    lines.append(markdown_table(table[RUN_TABLE_COLUMNS]).rstrip("\n"))
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def write_runs(table: pd.DataFrame, text: str, folder: Path | str) -> None:
    """runs.csv (every column) and runs.md (the printed text) in `folder`."""
    folder = Path(folder)
    with atomic_writer(folder / "runs.csv") as handle:
        table.to_csv(handle, index=False)
    write_text(folder / "runs.md", text)
