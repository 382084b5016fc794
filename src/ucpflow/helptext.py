"""`snakemake help`: the targets and every config key with its default and meaning, read from the schema."""

import json
import textwrap

WIDTH = 100


def _default(spec: dict) -> str:
    if "default" not in spec:
        return "(required)"
    value = spec["default"]
    return '""' if value == "" else json.dumps(value) if not isinstance(value, str) else value


def config_keys(schema: dict, prefix: str = "") -> list:
    """[(key, default, meaning)] of every key of the schema, nested keys as `parent.key`, in schema order."""
    rows = []
    for key, spec in schema.get("properties", {}).items():
        if spec.get("type") == "object" and "properties" in spec:
            rows.extend(config_keys(spec, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", _default(spec), spec.get("description", "")))
    return rows


def _block(lines: list, head: str, text: str) -> None:
    lines.append(head)
    lines.extend(textwrap.wrap(text, WIDTH, initial_indent="      ", subsequent_indent="      "))


def help_text(schema_path: str, targets: list) -> str:
    """The help page: `targets` as [(name, one-line description)], then the schema's keys."""
    import yaml

    with open(schema_path) as handle:
        schema = yaml.safe_load(handle)
    lines = ["ucpflow targets (run `snakemake --cores N <target> --config key=value ...`):"]
    width = max(len(name) for name, _ in targets)
    lines += [f"  {name:<{width}}  {description}" for name, description in targets]
    lines.append("")
    lines.append("Config keys (`--config key=value`, nested ones as YAML: `--config 'demo={kind: hf_llama}'`; or a YAML "
                 "file with `--configfile`; from schemas/config.schema.yaml):")
    for key, default, meaning in config_keys(schema):
        _block(lines, f"  {key} (default: {default})", meaning)
    return "\n".join(lines)
