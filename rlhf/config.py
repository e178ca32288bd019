"""Config parsing shared by every `rlhf` command: a YAML file plus `--field value` overrides, the TRL way."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml
from trl import TrlParser


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message names the field and what was expected."""


# the command being run ("rlhf train ddpo"), set by the `rlhf` dispatcher: help, usage and resume hints name it
_COMMAND: ContextVar[str] = ContextVar("rlhf_command", default="rlhf")
# the one-line description of that command, for the top of its --help
_SUMMARY: ContextVar[str] = ContextVar("rlhf_command_summary", default="")


@contextmanager
def running_command(name: str, summary: str = "") -> Iterator[None]:
    """Within this block `current_command()` is `name` (e.g. "rlhf train ddpo")."""
    tokens = _COMMAND.set(name), _SUMMARY.set(summary)
    try:
        yield
    finally:
        _COMMAND.reset(tokens[0])
        _SUMMARY.reset(tokens[1])


def current_command() -> str:
    """The full name of the running `rlhf` command ("rlhf" outside the dispatcher)."""
    return _COMMAND.get()


class _Parser(TrlParser):
    """`TrlParser` whose errors are raised as one `ConfigError` naming the field, instead of argparse's usage dump
    and exit 2 (a DDPO config's usage alone is ~60 lines)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _allowed_keys(dataclass_types: Sequence[type]) -> list[str]:
    return sorted(f.name for t in dataclass_types for f in dataclasses.fields(t))


def _closest(unknown: Sequence[str], allowed: Sequence[str]) -> str:
    """" (did you mean: num_epoch -> num_epochs)" for the unknown keys that have a close allowed key, else ""."""
    pairs = []
    for key in unknown:
        name = key.lstrip("-").split("=")[0]
        close = difflib.get_close_matches(name, allowed, n=1)
        if close:
            pairs.append(f"{name} -> {close[0]}")
    return f" (did you mean: {', '.join(pairs)})" if pairs else ""


def build_parser(types: Sequence[type]) -> TrlParser:
    """The parser of `types`: usage and description name the running command, abbreviations are refused (an
    unknown key is an error, so `--num_epoch` must not silently mean `--num_epochs`), and with several dataclasses
    each gets its own help section in order (ours before TRL's inherited ones)."""
    command = current_command()
    # no dataclasses given here: their fields are added below, into the help section each dataclass gets
    parser = _Parser(
        None,
        prog=command,
        usage=f"{command} [--config FILE.yaml] [--field value ...]",
        description=_SUMMARY.get() or None,
        allow_abbrev=False,
    )
    parser.dataclass_types = list(types)
    for kind in types:
        section = parser
        if len(types) > 1:  # a help section titled by the dataclass and its module ("RewardConfig (trl)"), in order
            doc = (kind.__doc__ or "").strip().splitlines()
            section = parser.add_argument_group(f"{kind.__name__} ({kind.__module__.split('.')[0]})",
                                                doc[0] if doc else None)
        _add_fields(parser, kind, section)
    return parser


def _add_fields(parser: TrlParser, kind: type, section: Any) -> None:
    """`kind`'s fields as options in `section`, the way `HfArgumentParser` adds them; a field typed `dict` parses
    JSON (a YAML mapping in a config file arrives as a dict already)."""
    hints = typing.get_type_hints(kind)
    for f in dataclasses.fields(kind):
        if not f.init:
            continue
        f.type = hints[f.name]  # HfArgumentParser reads the resolved annotation from the field, as it does itself
        # HfArgumentParser (TRL's copy of it) has no public way to add a dataclass's fields into a given argument
        # group (its `_argument_group_name` class attribute would have to be set on TRL's own classes); its field
        # builder, a static method, takes the group to add to
        parser._parse_dataclass_field(section, f)
        if f.type is dict or typing.get_origin(f.type) is dict:  # f.type: what the builder kept of an Optional
            parser.register("type", f.type, _json_object)  # argparse's type registry, read when a value is parsed


def parse_config(dataclass_types: type | Sequence[type], argv: Sequence[str] | None) -> tuple[Any, ...]:
    """Parse `--config file.yaml` and `--field value` overrides into instances of `dataclass_types`.

    Unknown keys, in the file or on the command line, raise `ConfigError` naming the key (with the closest allowed
    one) and the allowed ones; so does a value of the wrong type. Fields typed `dict` take a YAML mapping in the
    file or JSON on the command line. `--help` prints the running command's help and exits 0 (`SystemExit`).
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
            raise ConfigError(f"unknown config key(s) {unknown} in {path}{_closest(unknown, allowed)}; "
                              f"allowed keys: {allowed}")
    *parsed, remaining = build_parser(types).parse_args_and_config(argv, return_remaining_strings=True)
    if remaining:
        flags = [item for item in remaining if item.startswith("-")]
        raise ConfigError(f"unknown argument(s) {remaining}{_closest(flags, allowed)}; allowed keys: {allowed}")
    return tuple(parsed)


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("expected a JSON object")
    return value


def save_config(config: Any | Sequence[Any], path: str | Path) -> None:
    """Write a dataclass config (or several, merged in order, as one command parses them) as YAML: the resolved
    config every run keeps beside its outputs, which `--config` reads back."""
    configs = config if isinstance(config, (list, tuple)) else [config]
    merged = {key: value for item in configs for key, value in dataclasses.asdict(item).items()}
    Path(path).write_text(yaml.safe_dump(merged, sort_keys=False))
