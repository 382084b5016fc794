"""Workflow settings derived from the validated config, and config errors in one sentence."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UcpflowError
from .markers import latest_universal_path

BOOLEAN_WORDS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def coerce_booleans(config: dict[str, Any], schema_path: Path | str) -> None:
    """`--config strict=false` arrives as the string 'false'; read such words as the booleans the schema wants."""
    with open(schema_path) as handle:
        properties = yaml.safe_load(handle).get("properties", {})
    for key, spec in properties.items():
        value = config.get(key)
        if spec.get("type") == "boolean" and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
            config[key] = BOOLEAN_WORDS[value.lower()]


def explain_validation_error(error: BaseException) -> str:
    """One sentence for a jsonschema ValidationError wrapped in Snakemake's WorkflowError."""
    cause = error.__cause__ or error.__context__
    if not hasattr(cause, "absolute_path"):
        return f"The config is invalid: {error}"
    key = ".".join(str(part) for part in cause.absolute_path)
    return f"Config key `{key}`: {cause.message}." if key else f"Config: {cause.message}."


def default_work_folder(output_folder: str) -> str:
    absolute = os.path.abspath(output_folder)
    digest = hashlib.sha1(absolute.encode()).hexdigest()[:8]
    return os.path.join("ucpflow-work", f"{os.path.basename(absolute)}-{digest}")


@dataclass(frozen=True)
class Settings:
    input_folder: str
    output_folder: str
    work_folder: str
    demo_folder: str
    latest_universal: str

    @property
    def builds_demo(self) -> bool:
        return os.path.normpath(self.input_folder) == os.path.normpath(self.demo_folder)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Settings:
        output = os.path.normpath(config["output_folder"])
        settings = cls(
            input_folder=os.path.normpath(config["input_folder"]),
            output_folder=output,
            work_folder=os.path.normpath(config.get("work_folder") or default_work_folder(output)),
            demo_folder=os.path.normpath(config["demo"]["folder"]),
            latest_universal=latest_universal_path(output),
        )
        if not settings.builds_demo and not os.path.isdir(settings.input_folder):
            raise UcpflowError(f"Config key `input_folder`: {settings.input_folder} does not exist or is not a folder.")
        if os.path.abspath(output) == os.path.abspath(settings.input_folder):
            raise UcpflowError("Config keys `input_folder` and `output_folder` name the same folder.")
        return settings
