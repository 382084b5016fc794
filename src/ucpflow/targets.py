"""Which saves a workflow run converts, and where each one's outputs and work go.

A single checkpoint (a tag folder, a folder whose `latest` names one, the demo) is one save, converted into
the folders the config names. A run folder with `tags` (all, a list or a glob) or `every` set is many saves:
each selected, complete save gets `<tag>_universal` in the universal root and `<tag>/` in the hf, megatron and
reshard roots (ucpflow.markers.save_folders). Either way every rule's paths name the save through wildcards
whose values are given here (the `*_key` properties), so one DAG holds every save's jobs.

A save's work (index, maps, plans) lives in the work folder under its input signature: `<signature>/` for a
single checkpoint, `<tag>/<signature>/` for a save of a run. An unchanged save keeps its signature, so its
index and everything after it are not done again.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import TAGS_LATEST, Settings, refuse_folders_inside_input, refuse_reshard_folder
from .errors import UcpflowError
from .markers import save_folders
from .smk import SAVE_WILDCARDS
from .source.saves import BEING_WRITTEN, COMPLETE, UNIVERSAL_SUFFIX, Save, list_saves
from .source.signature import workflow_signature

GLOB_CHARACTERS = "*?["


@dataclass(frozen=True)
class SaveTarget:
    """One save this run converts: what its index reads, its signature and where each target writes."""

    tag: str
    step: int | None
    # The folder the index reads (a tag folder, or a folder whose `latest` names it) and the tag folder itself.
    input_folder: str
    tag_folder: str
    signature: str
    # The save's work folder, relative to the work folder.
    derived: str
    universal: str
    hf: str
    megatron: str
    reshard: str
    # verify's tables (relative to the work folder) and inspect_reshard's table (relative to the inspect folder,
    # without `.md`).
    verify: str
    inspect_reshard: str

    def key(self, wildcard: str) -> str:
        """The value of `wildcard` (one of SAVE_WILDCARDS) in this save's paths: a folder's name in its root,
        or a path relative to the work or inspect folder."""
        if wildcard in ("universal", "hf", "megatron", "reshard"):
            return os.path.basename(getattr(self, wildcard))
        return getattr(self, wildcard)


@dataclass(frozen=True)
class Selection:
    """The saves of this run, in step order, and what the run says about the others (one line each)."""

    saves: tuple[SaveTarget, ...]
    notices: tuple[str, ...] = ()

    def root(self, wildcard: str) -> str:
        """The folder that holds every save's folder of a target ("" when they lie in the working directory)."""
        roots = {os.path.dirname(os.path.normpath(getattr(save, wildcard))) for save in self.saves}
        if len(roots) > 1:
            raise UcpflowError(f"The saves' {wildcard} folders lie in different folders: {sorted(roots)}.")
        return roots.pop() if roots else ""

    def by(self, wildcard: str) -> dict[str, SaveTarget]:
        return {save.key(wildcard): save for save in self.saves}

    @property
    def newest(self) -> SaveTarget | None:
        return self.saves[-1] if self.saves else None


def select(config: Mapping[str, Any], settings: Settings) -> Selection:
    """The saves to convert: the one checkpoint of a single-checkpoint config, else the run's saves that
    `tags` and `every` choose (see choose_saves)."""
    if settings.unconvertible:
        return Selection(())
    if not settings.many:
        return Selection((_single(config, settings),))
    saves = list_saves(settings.input_folder)
    chosen, notices = choose_saves(saves, config.get("tags", "all"), int(config.get("every") or 0),
                                   settings.input_folder)
    targets = tuple(_of_save(config, settings, save) for save in chosen)
    _refuse_shared_folders(targets)
    if not targets:
        notices.append(f"no save of {settings.input_folder} is chosen and ready to convert (it holds {len(saves)}).")
    return Selection(targets, tuple(notices) + tuple(_vanished(saves, settings)))


def _single(config, settings):
    signature = workflow_signature(config, settings.input_folder, settings.builds_demo)
    tag_folder = settings.tag_folder or settings.input_folder
    return SaveTarget(
        tag=os.path.basename(tag_folder), step=None, input_folder=settings.input_folder, tag_folder=tag_folder,
        signature=signature, derived=signature, universal=settings.output_folder, hf=settings.hf_folder,
        megatron=settings.megatron_folder, reshard=settings.reshard_folder, verify="verify",
        inspect_reshard="reshard",
    )


def _of_save(config, settings, save):
    folders = save_folders(settings.output_folder, settings.hf_folder, settings.megatron_folder,
                           settings.reshard_folder, save.tag)
    written = [(f"{key}_folder" if key != "universal" else "output_folder", folder) for key, folder in folders.items()]
    refuse_folders_inside_input(save.folder, written + [("work_folder", settings.work_folder),
                                                        ("inspect_folder", settings.inspect_folder)])
    refuse_reshard_folder(folders["reshard"], save.folder, folders["universal"])
    # The save's path joins the signature: two byte-identical saves of one run still get their own work.
    signature = workflow_signature(config, save.folder, False, save.folder)
    return SaveTarget(
        tag=save.tag, step=save.step, input_folder=save.folder, tag_folder=save.folder, signature=signature,
        derived=f"{save.tag}/{signature}", verify=f"verify/{save.tag}", inspect_reshard=f"reshard/{save.tag}",
        **folders,
    )


def _refuse_shared_folders(targets):
    tags = [target.tag for target in targets]
    repeated = sorted({tag for tag in tags if tags.count(tag) > 1})
    if repeated:
        folders = [target.tag_folder for target in targets if target.tag == repeated[0]]
        raise UcpflowError(f"Config key `tags`: the saves {', '.join(folders)} share the tag {repeated[0]}, so their "
                           "outputs would share folders; choose one of them with `tags`.")


def _requested(tags):
    """The config's tags as a list of names or globs; "all" (or every save) as None."""
    if isinstance(tags, str):
        tags = [part.strip() for part in tags.split(",") if part.strip()]
    tags = [str(tag) for tag in tags]
    return None if tags in ([], ["all"]) else tags


def _names_of(save, run_folder):
    """The names a save answers to in `tags`: its tag, its holder (checkpoint-N) and holder/tag."""
    names = {save.tag, os.path.relpath(save.folder, run_folder)}
    if os.path.normpath(save.holder) != os.path.normpath(run_folder):
        names.add(os.path.basename(save.holder))
    return names


def choose_saves(saves: Sequence[Save], tags: str | Sequence[str], every: int,
                 run_folder: str) -> tuple[list[Save], list[str]]:
    """(the complete saves chosen, one notice per chosen save left out). `tags` is "all" (or "latest", the
    newest save), names or globs of tags (`global_step*`) or HF Trainer folders (`checkpoint-*`); `every` keeps
    only saves whose step is a multiple of it. A save being written is skipped; an incomplete one is reported,
    and refused when it was named, not globbed."""
    requested = _requested(tags)
    if requested == [TAGS_LATEST]:
        requested = [saves[-1].tag] if saves else []
    named = [tag for tag in requested or [] if not any(c in tag for c in GLOB_CHARACTERS)]
    if named:
        known = set().union(*(_names_of(save, run_folder) for save in saves)) if saves else set()
        missing = [tag for tag in named if tag not in known]
        if missing:
            listed = ", ".join(save.tag for save in saves) or "none"
            raise UcpflowError(f"Config key `tags`: {run_folder} has no save named {missing[0]}; its saves are {listed}.")
    chosen, notices = [], []
    for save in saves:
        names = _names_of(save, run_folder)
        if requested is not None and not any(fnmatch.fnmatchcase(name, tag) for name in names for tag in requested):
            continue
        if every and (save.step is None or save.step % every):
            continue
        where = os.path.relpath(save.folder, run_folder)
        if save.state == COMPLETE:
            chosen.append(save)
        elif save.state == BEING_WRITTEN:
            notices.append(f"{where}: skipped, {save.detail[0].lower()}{save.detail[1:]} It is converted by a later run.")
        elif names & set(named):
            raise UcpflowError(f"Config key `tags` names {where}, which cannot be converted: {save.detail}")
        else:
            notices.append(f"{where}: not converted, its files are incomplete: {save.detail}")
    return chosen, notices


def _subfolders(root):
    root = Path(root)
    return sorted(entry for entry in root.iterdir() if entry.is_dir()) if root.is_dir() else []


def _vanished(saves, settings):
    """One line for each tag whose save is gone from the run (deleted by the trainer's rotation, say) but whose
    outputs of an earlier run are still in the roots: they stay where they are."""
    tags = {save.tag for save in saves}
    left = {}
    for entry in _subfolders(settings.output_folder):
        if entry.name.endswith(UNIVERSAL_SUFFIX):
            left.setdefault(entry.name[: -len(UNIVERSAL_SUFFIX)], []).append(str(entry))
    for root in (settings.hf_folder, settings.megatron_folder, settings.reshard_folder):
        for entry in _subfolders(root):
            left.setdefault(entry.name, []).append(str(entry))
    return [f"{tag}: its save is gone from {settings.input_folder}; the outputs converted from it stay "
            f"({', '.join(folders)})." for tag, folders in sorted(left.items()) if tag not in tags]
