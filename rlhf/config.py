"""Config parsing shared by every `rlhf` command: a YAML file plus `--field value` overrides, the TRL way."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import yaml
from trl import TrlParser


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message names the field and what was expected."""


def _allowed_keys(dataclass_types: Sequence[type]) -> list[str]:
    return sorted(f.name for t in dataclass_types for f in dataclasses.fields(t))


def parse_config(dataclass_types: type | Sequence[type], argv: Sequence[str] | None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` and `--field value` overrides into instances of `dataclass_types`.

    Unknown keys, in the file or on the command line, raise `ConfigError` naming the key and
    the allowed ones. Fields typed `dict` take a YAML mapping in the file or JSON on the command line.
    """
    types = list(dataclass_types) if isinstance(dataclass_types, (list, tuple)) else [dataclass_types]
    argv = list(argv or [])
    allowed = _allowed_keys(types)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise ConfigError("--config expects a path to a YAML file")
        path = Path(argv[index + 1])
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        loaded = yaml.safe_load(path.read_text())
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a YAML mapping of field: value")
        unknown = sorted(set(loaded) - set(allowed) - {"env"})
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown} in {path}; allowed keys: {allowed}")
    parser = TrlParser(types)
    dict_fields = {f.name for t in types for f in dataclasses.fields(t) if _is_dict_field(f)}
    for action in parser._actions:
        if action.dest in dict_fields:
            action.type = _json_object
    try:
        *parsed, remaining = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except SystemExit as exc:  # argparse exits on a bad type; turn it into an error that says so
        raise ConfigError(f"could not parse arguments {argv}; allowed keys: {allowed}") from exc
    if remaining:
        raise ConfigError(f"unknown argument(s) {remaining}; allowed keys: {allowed}")
    return tuple(parsed)


def _is_dict_field(f: dataclasses.Field) -> bool:
    return f.type in (dict, "dict") or str(f.type).startswith(("dict", "Dict", "typing.Dict"))


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def save_config(config: Any, path: str | Path) -> None:
    """Write a dataclass config as YAML (the resolved config every run keeps beside its outputs)."""
    Path(path).write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
