"""Typed settings: one dataclass per command, filled from a YAML file and `--flags`.

A field is declared with `setting(default, "help text")`. The same names work in YAML
(`num_layers: 6`) and on the command line (`--num-layers 6`); flags override the file.
Unknown keys are an error, and every validation problem is reported at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmshrink.errors import LmshrinkError


class SettingsError(LmshrinkError, ValueError):
    """A bad setting; the message names the field and the fix."""


def setting(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A documented dataclass field (`help` is shown by `lmshrink CMD --help`)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def check(problems: list[str]) -> None:
    """Raise once with every problem found by a settings `__post_init__`."""
    if problems:
        raise SettingsError("invalid settings:\n  - " + "\n  - ".join(problems))


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type without `None`, whether `None` is allowed)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Coerce a YAML or command-line value to the field's declared type."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if not optional:
            raise SettingsError(f"{name}: a value is required")
        return None
    origin = typing.get_origin(base)
    try:
        if origin is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            elif not isinstance(value, (list, tuple)):
                value = [value]
            return [item(v) for v in value]
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is dict or origin is dict:  # YAML mapping, or `key=value,key=value` on the command line
            if isinstance(value, str):
                value = dict(item.split("=", 1) for item in value.split(",") if item.strip())
            if not isinstance(value, dict):
                raise ValueError(value)
            return {str(k): _scalar(v) for k, v in value.items()}
        if base in (int, float, str):
            if base is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return base(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}: {value!r} is not a valid {_type_name(tp)}") from None
    return value


def _scalar(value: Any) -> Any:
    """A `key=value` flag's value: an int, float or boolean where it reads as one, else the string
    (not YAML's reading, which turns a Slurm time like 01:00:00 into 3600)."""
    if not isinstance(value, str):
        return value
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _type_name(tp: Any) -> str:
    base, optional = _base_type(tp)
    origin = typing.get_origin(base)
    if base is dict or origin is dict:
        return "mapping (YAML) or key=value,key=value" + (" or none" if optional else "")
    name = f"comma-separated list of {typing.get_args(base)[0].__name__}" if origin is list else base.__name__
    return name + (" or none" if optional else "")


def build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate settings class `cls` from a dict; unknown keys are an error."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {str(k).replace("-", "_"): v for k, v in values.items()}
    problems = []  # every unknown key, bad value and missing setting, reported at once
    unknown = [k for k in values if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        problems.append(f"unknown setting(s) {', '.join(map(repr, unknown))}; known settings are: {known}")
    kwargs = {}
    for key, value in values.items():
        if key in fields:
            try:
                kwargs[key] = _convert(key, hints[key], value)
            except SettingsError as err:
                problems.append(str(err))
    missing = [
        n for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        problems.append(f"missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    if len(problems) == 1:
        raise SettingsError(problems[0])
    check(problems)
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a settings YAML file (a mapping of field names to values)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except yaml.YAMLError as err:
        raise SettingsError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of setting names to values")
    return data


def parser_for(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per field (values parsed later by `build`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML file with settings (same names as the flags)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        help_text = f"{f.metadata.get('help', '')} [{_type_name(hints[f.name])}; default: {default}]"
        if _base_type(hints[f.name])[0] is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar="VALUE", help=help_text)
    return parser


def from_args(cls: type, argv: list[str], prog: str, description: str) -> Any:
    """Settings from `--config` YAML overridden by explicit flags."""
    args = vars(parser_for(cls, prog, description).parse_args(argv))
    config = args.pop("config")
    values = {str(k).replace("-", "_"): v for k, v in (load_yaml(config) if config else {}).items()}
    values.update({k: v for k, v in args.items() if v is not None})
    return build(cls, values)


def to_dict(settings: Any) -> dict[str, Any]:
    """Resolved settings as plain data (for provenance records)."""
    return dataclasses.asdict(settings)
