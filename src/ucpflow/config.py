"""Workflow settings derived from the validated config, and config errors in one sentence."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import dsconst as C
from .demo import check_demo, checkpoint_tag, demo_checkpoint_folder
from .errors import CheckpointError, UcpflowError
from .tables import LATEST_UNIVERSAL
from .markers import folder_beside, latest_universal_path, universal_folder_of
from .source.layout import resolve_tag_folder
from .source.saves import has_rank_files, holders, is_run_folder, is_trainer_output, latest_tag

# `tags` of a single conversion: the save a run folder's `latest` names.
TAGS_LATEST = "latest"
BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def _coerced(value, spec):
    if not isinstance(value, str):
        return value
    if spec.get("type") == "boolean" and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    if spec.get("type") == "integer" and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
        return int(value)
    return value


def coerce_command_line_values(config: dict[str, Any], schema_path: Path | str) -> None:
    """`--config strict=false` arrives as the string 'false' and `--config 'demo={steps: 2}'` as the string '2':
    read such words as the booleans and integers the schema wants, in nested settings too."""
    with open(schema_path) as handle:
        schema = yaml.safe_load(handle)

    def coerce(values, properties):
        for key, spec in properties.items():
            if isinstance(values.get(key), dict) and "properties" in spec:
                coerce(values[key], spec["properties"])
            elif key in values:
                values[key] = _coerced(values[key], spec)

    coerce(config, schema.get("properties", {}))


def _unknown_key_sentence(cause, prefix):
    """`Config key `merge_jobs` is not a ucpflow setting; did you mean `merge_min_jobs`?` for a typo."""
    known = list(cause.schema.get("properties", {}))
    unknown = sorted(key for key in cause.instance if key not in known)
    key = unknown[0] if unknown else "?"
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"did you mean `{prefix}{close[0]}`?" if close else "`snakemake help` lists every key."
    return f"Config key `{prefix}{key}` is not a ucpflow setting; {hint}"


def explain_validation_error(error: BaseException) -> str:
    """One sentence for a jsonschema ValidationError wrapped in Snakemake's WorkflowError."""
    cause = error.__cause__ or error.__context__
    if not hasattr(cause, "absolute_path"):
        return f"The config is invalid: {error}"
    key = ".".join(str(part) for part in cause.absolute_path)
    if cause.validator == "additionalProperties" and isinstance(cause.instance, dict):
        return _unknown_key_sentence(cause, f"{key}." if key else "")
    return f"Config key `{key}`: {cause.message}." if key else f"Config: {cause.message}."


def default_work_folder(output_folder: str) -> str:
    absolute = os.path.abspath(output_folder)
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return os.path.join("ucpflow-work", f"{os.path.basename(absolute)}-{digest}")


def _is_inside(folder, outer):
    folder, outer = os.path.realpath(folder), os.path.realpath(outer)
    return folder == outer or folder.startswith(outer.rstrip(os.sep) + os.sep)


def refuse_folders_inside_input(tag_folder: str, folders: list[tuple[str, str]]) -> None:
    """Refuse, in one sentence naming both, any (config key, folder) this run writes that lies in the input's
    tag folder: the next index would read what was written there as part of the checkpoint."""
    for key, folder in folders:
        if folder and _is_inside(folder, tag_folder):
            instead = f", such as {universal_folder_of(tag_folder)}" if key == "output_folder" else ""
            raise UcpflowError(
                f"Config key `{key}`: {folder} is inside the input's tag folder {tag_folder}, whose files are "
                f"the checkpoint; choose a folder outside it{instead}."
            )


def forget_vanished_demo(demo_folder: str, derived_folder: str) -> None:
    """The demo's work folder is named by its build settings, so it outlives a deleted demo checkpoint: once
    the demo's `latest` is gone, its index describes files that no longer exist and is removed, so the demo
    is built and indexed again instead of Snakemake trusting the old index."""
    if not os.path.exists(os.path.join(demo_folder, C.LATEST_FILE)):
        shutil.rmtree(os.path.join(derived_folder, "index"), ignore_errors=True)


def refuse_reshard_folder(reshard_folder: str, tag_folder: str, output_folder: str) -> None:
    """The reshard's checkpoint root gets a tag folder and `latest` of its own: it must not be the folder that
    holds the input's tag folder (whose files and `latest` it would overwrite), nor lie in the universal
    output, which it is written from."""
    if _is_inside(reshard_folder, output_folder):
        raise UcpflowError(f"Config key `reshard_folder`: {reshard_folder} lies inside the universal output folder "
                           f"{output_folder}.")
    if os.path.realpath(reshard_folder) == os.path.realpath(os.path.dirname(tag_folder)):
        raise UcpflowError(f"Config key `reshard_folder`: {reshard_folder} holds the input tag folder {tag_folder}, "
                           "whose files the reshard would overwrite.")


def trainer_output_sentence(input_folder: str) -> str:
    """Why a target other than `inspect` refuses the HF Trainer's output_dir, naming its newest checkpoint-N
    folder that holds a `latest` (a save the HF Trainer finished)."""
    checkpoints = holders(input_folder)
    newest = next((folder for folder in reversed(checkpoints) if latest_tag(folder)), checkpoints[-1])
    return (f"Config key `input_folder`: {input_folder} is the HF Trainer's output_dir, which holds many saves; "
            f"convert them with --config tags=all (or a list or glob of them), or set input_folder to one of its "
            f"checkpoint-N folders, such as {newest}.")


def selects_saves(config: Mapping[str, Any]) -> bool:
    """Whether the config converts saves of a run chosen by `tags` / `every` rather than one checkpoint."""
    tags = config.get("tags", TAGS_LATEST)
    return tags not in (TAGS_LATEST, [TAGS_LATEST]) or bool(config.get("every"))


def refuse_tags_for_checkpoint(input_folder: str, demo: bool) -> None:
    """`tags` and `every` choose among a run folder's saves: refuse them for a single tag folder or the demo."""
    if demo or has_rank_files(input_folder):
        what = "the demo checkpoint" if demo else f"{input_folder}, a tag folder of one save"
        raise UcpflowError(f"Config keys `tags` and `every` choose saves of a run folder, but input_folder is {what}; "
                           "set input_folder to the folder that holds the saves (DeepSpeed's save_dir or the HF "
                           "Trainer's output_dir).")


@dataclass(frozen=True)
class Settings:
    input_folder: str
    output_folder: str
    work_folder: str
    demo_folder: str
    latest_universal: str
    # The folder whose files are the checkpoint (the demo's: where its build will save it).
    tag_folder: str = ""
    hf_folder: str = ""
    megatron_folder: str = ""
    inspect_folder: str = ""
    reshard_folder: str = ""
    # The input is a training run's folder (several saves, or the HF Trainer's output_dir): `inspect` lists its
    # saves (ucpflow.source.saves), the other targets convert the save its `latest` names.
    run_folder: bool = False
    # Why the other targets cannot convert this input (one sentence), "" when they can: a run folder without a
    # `latest` (such as the HF Trainer's output_dir) names no save to convert.
    unconvertible: str = ""
    # The run's saves are chosen by `tags` / `every` (ucpflow.targets): output_folder, hf_folder, megatron_folder
    # and reshard_folder are then the roots that hold one folder per save.
    many: bool = False

    @property
    def builds_demo(self) -> bool:
        return os.path.normpath(self.input_folder) == os.path.normpath(self.demo_folder)

    def written_folders(self) -> list[tuple[str, str]]:
        """(config key, folder) of every folder a target writes; folder keys added to the schema belong here."""
        return [
            ("output_folder", self.output_folder),
            ("work_folder", self.work_folder),
            ("hf_folder", self.hf_folder),
            ("megatron_folder", self.megatron_folder),
            ("inspect_folder", self.inspect_folder),
            ("reshard_folder", self.reshard_folder),
        ]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        check_demo(config["demo"])
        demo_folder = os.path.normpath(demo_checkpoint_folder(config["demo"]))
        input_folder = os.path.normpath(config.get("input_folder") or demo_folder)
        if selects_saves(config):
            return cls._of_run(config, input_folder, demo_folder)
        unreadable = None  # the input's own problem, reported after the config's folders are checked
        run_folder, unconvertible = False, ""
        if input_folder == demo_folder:
            tag_folder = os.path.join(demo_folder, checkpoint_tag(config["demo"]["steps"]))
        elif not os.path.isdir(input_folder):
            raise UcpflowError(f"Config key `input_folder`: {input_folder} does not exist or is not a folder.")
        elif is_trainer_output(input_folder):
            run_folder, tag_folder = True, input_folder
            unconvertible = trainer_output_sentence(input_folder)
        else:
            run_folder = is_run_folder(input_folder)
            try:
                tag_folder = str(resolve_tag_folder(input_folder))
            except CheckpointError as problem:
                tag_folder = input_folder
                if run_folder:
                    unconvertible = str(problem)
                else:
                    unreadable = problem
        output = os.path.normpath(config.get("output_folder") or universal_folder_of(tag_folder))
        if os.path.abspath(output) in (os.path.abspath(input_folder), os.path.abspath(tag_folder)):
            raise UcpflowError("Config keys `input_folder` and `output_folder` name the same folder.")
        work = os.path.normpath(config.get("work_folder") or default_work_folder(output))
        settings = cls(
            input_folder=input_folder,
            output_folder=output,
            work_folder=work,
            demo_folder=demo_folder,
            latest_universal=latest_universal_path(output),
            tag_folder=tag_folder,
            hf_folder=os.path.normpath(config.get("hf_folder") or folder_beside(output, "hf")),
            megatron_folder=os.path.normpath(config.get("megatron_folder") or folder_beside(output, "megatron")),
            inspect_folder=os.path.normpath(config.get("inspect_folder") or os.path.join(work, "inspect")),
            reshard_folder=os.path.normpath(config.get("reshard_folder") or folder_beside(output, "reshard")),
            run_folder=run_folder,
            unconvertible=unconvertible,
        )
        refuse_folders_inside_input(tag_folder, settings.written_folders())
        refuse_reshard_folder(settings.reshard_folder, tag_folder, output)
        if unreadable is not None:
            raise unreadable
        return settings

    @classmethod
    def _of_run(cls, config: Mapping[str, Any], input_folder: str, demo_folder: str) -> Settings:
        """A run folder whose saves `tags` / `every` choose: the folders are roots holding one folder per save
        (the universal root is output_folder, else the run folder itself; ucpflow.targets checks each save's)."""
        if not os.path.isdir(input_folder):
            raise UcpflowError(f"Config key `input_folder`: {input_folder} does not exist or is not a folder.")
        refuse_tags_for_checkpoint(input_folder, input_folder == demo_folder)
        root = os.path.normpath(config.get("output_folder") or input_folder)
        work = os.path.normpath(config.get("work_folder") or default_work_folder(root))
        return cls(
            input_folder=input_folder,
            output_folder=root,
            work_folder=work,
            demo_folder=demo_folder,
            latest_universal=os.path.join(root, LATEST_UNIVERSAL),
            hf_folder=os.path.normpath(config.get("hf_folder") or os.path.join(root, "hf")),
            megatron_folder=os.path.normpath(config.get("megatron_folder") or os.path.join(root, "megatron")),
            inspect_folder=os.path.normpath(config.get("inspect_folder") or os.path.join(work, "inspect")),
            reshard_folder=os.path.normpath(config.get("reshard_folder") or os.path.join(root, "reshard")),
            run_folder=True,
            many=True,
        )
