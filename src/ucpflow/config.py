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

from .demo import check_demo, checkpoint_tag, demo_checkpoint_folder
from .errors import CheckpointError, UcpflowError
from .markers import latest_universal_path, universal_folder_of
from .source.layout import resolve_tag_folder
from .source.saves import holders, is_run_folder, is_trainer_output, latest_tag

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
    if not os.path.exists(os.path.join(demo_folder, "latest")):
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
    return (f"Config key `input_folder`: {input_folder} is the HF Trainer's output_dir, whose saves only `inspect` "
            f"lists; set input_folder to one of its checkpoint-N folders, such as {newest}.")


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
            hf_folder=os.path.normpath(config.get("hf_folder") or os.path.join(os.path.dirname(output), "hf")),
            megatron_folder=os.path.normpath(
                config.get("megatron_folder") or os.path.join(os.path.dirname(output), "megatron")
            ),
            inspect_folder=os.path.normpath(config.get("inspect_folder") or os.path.join(work, "inspect")),
            reshard_folder=os.path.normpath(config.get("reshard_folder") or os.path.join(os.path.dirname(output), "reshard")),
            run_folder=run_folder,
            unconvertible=unconvertible,
        )
        refuse_folders_inside_input(tag_folder, settings.written_folders())
        refuse_reshard_folder(settings.reshard_folder, tag_folder, output)
        if unreadable is not None:
            raise unreadable
        return settings
