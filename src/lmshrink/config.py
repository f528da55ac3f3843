"""Typed settings: one dataclass per command, composed of shared groups, filled from YAML and `--flags`.

A field is declared with `setting(default, "help text")`; a group of fields shared by several
commands (the training data, the optimiser, the KD recipe, ...) is a dataclass of its own, held
by a command's settings through `group(factory, "help")`, so one recipe can hand another a
group unchanged. Every field has a dotted path (`train.lr`); where its own name is unique in
the command, that name works too. The same names work in YAML (`lr: 1e-4`, or nested:
`train: {lr: 1e-4}`) and on the command line (`--lr 1e-4` or `--train.lr 1e-4`); flags
override the file. Unknown keys are an error, and every validation problem is reported at once.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmshrink.errors import LmshrinkError
from lmshrink.records import output_problem


class SettingsError(LmshrinkError, ValueError):
    """A bad setting; the message names the field and the fix."""


def setting(default: Any = dataclasses.MISSING, help: str = "", how_to_run: bool = False) -> Any:
    """A documented dataclass field (`help` is shown by `lmshrink CMD --help`). `how_to_run`: the
    setting says how to run, not what the result is (loggers, checkpoint intervals, workers, where
    the output goes), so a run carried on or reused with another value is the same run
    (`how_to_run_paths`)."""
    metadata = {"help": help, "how_to_run": how_to_run}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def group(factory: Any, help: str = "") -> Any:
    """A field holding a settings group (a dataclass whose fields all have defaults); `factory`
    makes the command's default, e.g. `lambda: TrainArgs(lr=2.5e-4)`."""
    return dataclasses.field(default_factory=factory, metadata={"help": help, "group": True})


class Settings:
    """Base of a command's settings: validated on creation, with every problem of the command
    and of its groups (each group's `problems()`) raised at once; an `output` setting must name a
    folder that can be written (`records.output_problem`)."""

    def __post_init__(self) -> None:
        check(self.problems())

    def problems(self) -> list[str]:
        found = []
        output = getattr(self, "output", None)  # every command's output is a folder
        if isinstance(output, str) and (problem := output_problem(output)):
            found.append(f"output: {problem}")
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("group") and hasattr(getattr(self, f.name), "problems"):
                found += getattr(self, f.name).problems()
        return found


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
        raise SettingsError(f"{name}: {value!r} is not a valid {type_name(tp)}") from None
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


def type_name(tp: Any) -> str:
    base, optional = _base_type(tp)
    origin = typing.get_origin(base)
    if base is dict or origin is dict:
        return "mapping (YAML) or key=value,key=value" + (" or none" if optional else "")
    name = f"comma-separated list of {typing.get_args(base)[0].__name__}" if origin is list else base.__name__
    return name + (" or none" if optional else "")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One setting of a command: its dotted path, declared type and field."""

    path: str
    hint: Any
    field: dataclasses.Field


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every setting of `cls`, its groups' settings included (depth first)."""
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            found += leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            found.append(Leaf(prefix + f.name, hints[f.name], f))
    return found


def how_to_run_paths(cls: type) -> set[str]:
    """Dotted paths of the settings of `cls` marked `how_to_run`: the ones a run's identity ignores."""
    return {leaf.path for leaf in leaves(cls) if leaf.field.metadata.get("how_to_run")}


def alternatives(cls: type, prefix: str = "") -> list[tuple[str, ...]]:
    """Dotted paths of settings that bound the same thing (a group's `ALTERNATIVES`, e.g. max_steps
    and max_tokens): one given replaces the others' command defaults, and a flag replaces the
    others given in a config file; two given at the same level are the group's `problems()`."""
    found = [tuple(prefix + name for name in names) for names in getattr(cls, "ALTERNATIVES", ())]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            found += alternatives(hints[f.name], f"{prefix}{f.name}.")
    return found


def names(cls: type) -> dict[str, str]:
    """Accepted name -> dotted path: every path, and each field's own name where it is unique."""
    paths = [leaf.path for leaf in leaves(cls)]
    short: dict[str, list[str]] = {}
    for path in paths:
        short.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return {**{n: p[0] for n, p in short.items() if len(p) == 1}, **{p: p for p in paths}}


def _flatten(values: dict[str, Any], groups: set[str], prefix: str = "") -> dict[str, Any]:
    """A YAML mapping with nested groups (`train: {lr: 1}`) as dotted keys (`train.lr`)."""
    flat = {}
    for key, value in values.items():
        key = prefix + str(key).replace("-", "_")
        if key in groups and isinstance(value, dict):
            flat.update(_flatten(value, groups, key + "."))
        else:
            flat[key] = value
    return flat


def build(cls: type, values: dict[str, Any]) -> Any:
    """Instantiate settings class `cls` from a dict (flat names, dotted paths or nested groups);
    unknown keys, bad values and missing settings are reported together."""
    all_leaves = {leaf.path: leaf for leaf in leaves(cls)}
    known = names(cls)
    groups = {path.rsplit(".", i)[0] for path in all_leaves for i in range(1, path.count(".") + 1)}
    problems = []
    unknown = []
    converted: dict[str, Any] = {}
    for key, value in _flatten(values, groups).items():
        if key not in known:
            same = [p for p in all_leaves if p.rsplit(".", 1)[-1] == key]
            if same:  # a name two groups share: the dotted path says which
                problems.append(f"{key}: this command has several; say which: {', '.join(same)}")
            else:
                unknown.append(key)
            continue
        leaf = all_leaves[known[key]]
        try:
            converted[leaf.path] = _convert(leaf.path, leaf.hint, value)
        except SettingsError as err:
            problems.append(str(err))
    if unknown:
        problems.insert(0, f"unknown setting(s) {', '.join(map(repr, unknown))}; known settings are: "
                           f"{', '.join(sorted(n for n in known if '.' not in n or n.rsplit('.', 1)[-1] not in known))}")
    missing = [p for p, leaf in all_leaves.items() if p not in converted and _required(leaf.field)]
    if missing:
        problems.append(f"missing required setting(s): {', '.join('--' + flag_name(m) for m in missing)}")
    if len(problems) == 1:
        raise SettingsError(problems[0])
    check(problems)
    if hasattr(cls, "PRESETS"):  # a named preset (distill's --recipe) fills what was not given
        key, table = cls.PRESETS
        chosen = converted.get(key, all_leaves[key].field.default)
        for path, value in table.get(chosen, {}).items():
            converted.setdefault(path, copy.deepcopy(value))  # a run never shares the table's lists
    for paths in alternatives(cls):  # the one given wins over the others' defaults (a command's own included)
        given = [p for p in paths if p in converted]
        if len(given) == 1:
            converted.update({p: all_leaves[p].field.default for p in paths if p != given[0]})
    return _instantiate(cls, converted)


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _instantiate(cls: type, values: dict[str, Any], prefix: str = "", default: Any = None) -> Any:
    """`cls` (or a copy of the group `default`) with the dotted `values` under `prefix` applied."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.metadata.get("group"):
            inner = f.default_factory() if default is None else getattr(default, f.name)
            if any(p.startswith(path + ".") for p in values):
                kwargs[f.name] = _instantiate(type(inner), values, path + ".", inner)
            elif default is None:
                kwargs[f.name] = inner
        elif path in values:
            kwargs[f.name] = values[path]
    return cls(**kwargs) if default is None else dataclasses.replace(default, **kwargs)


def flag_name(path: str) -> str:
    return path.replace("_", "-")


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


def parser_for(cls: type, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per setting (values parsed later by `build`); a group's
    settings are listed under its name, each as `--name` where unique and always as `--group.name`."""
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    parser.add_argument("--config", help="YAML file with settings (same names as the flags)")
    short = {path: name for name, path in names(cls).items() if name != path}
    sections: dict[str, Any] = {}
    defaults = defaults_of(cls)
    for leaf in leaves(cls):
        flags = ([f"--{flag_name(short[leaf.path])}"] if leaf.path in short else []) + [f"--{flag_name(leaf.path)}"]
        head = leaf.path.split(".")[0] if "." in leaf.path else ""
        if head and head not in sections:
            help_text = next(f.metadata.get("help", "") for f in dataclasses.fields(cls) if f.name == head)
            sections[head] = parser.add_argument_group(f"{head} settings", help_text)
        target = sections[head] if head else parser
        default = defaults.get(leaf.path, "required")
        help_text = f"{leaf.field.metadata.get('help', '')} [{type_name(leaf.hint)}; default: {default}]"
        if _base_type(leaf.hint)[0] is bool:
            target.add_argument(*flags, dest=leaf.path, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            target.add_argument(*flags, dest=leaf.path, default=None, metavar="VALUE", help=help_text)
    return parser


def defaults_of(cls: type, prefix: str = "", instance: Any = None) -> dict[str, Any]:
    """Dotted path -> the command's default (a group's default comes from its factory)."""
    found = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            inner = f.default_factory() if instance is None else getattr(instance, f.name)
            found.update(defaults_of(type(inner), f"{prefix}{f.name}.", inner))
        elif instance is not None:
            found[prefix + f.name] = getattr(instance, f.name)
        elif not _required(f):
            found[prefix + f.name] = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return found


def from_args(cls: type, argv: list[str], prog: str, description: str, epilog: str | None = None) -> Any:
    """Settings from `--config` YAML overridden by explicit flags."""
    paths = [leaf.path for leaf in leaves(cls)]
    for arg in argv:  # a name two groups share: say which groups, not argparse's "unrecognized"
        name = arg.removeprefix("--").split("=", 1)[0].removeprefix("no-").replace("-", "_")
        same = [p for p in paths if p.rsplit(".", 1)[-1] == name]
        if arg.startswith("--") and name not in paths and len(same) > 1:
            raise SettingsError(f"--{flag_name(name)}: this command has several; say which: "
                                f"{', '.join('--' + flag_name(p) for p in same)}")
    args = vars(parser_for(cls, prog, description, epilog).parse_args(argv))
    config = args.pop("config")
    values = load_yaml(config) if config else {}
    groups = {p.rsplit(".", i)[0] for p in (leaf.path for leaf in leaves(cls)) for i in range(1, p.count(".") + 1)}
    values = _flatten(values, groups)
    known = names(cls)
    flagged = {path for path, value in args.items() if value is not None}
    for paths in alternatives(cls):  # --max-steps replaces the file's max_tokens, and so on
        if flagged & set(paths):
            values = {k: v for k, v in values.items() if known.get(k) not in set(paths) - flagged}
    for path in flagged:  # a flag replaces the file's value, whichever name the file used
        values = {k: v for k, v in values.items() if known.get(k) != path}
        values[path] = args[path]
    return build(cls, values)


def to_dict(settings: Any) -> dict[str, Any]:
    """Resolved settings as plain data, groups nested (for provenance records; `build` reads it back)."""
    return dataclasses.asdict(settings)


def recorded(settings: dict[str, Any], name: str, default: Any = None) -> Any:
    """A setting from a record's resolved settings by its own name, wherever its group put it
    (`recorded(record["settings"], "lr")` finds `train.lr`)."""
    if name in settings:
        return settings[name]
    for value in settings.values():
        if isinstance(value, dict) and name in value:
            return value[name]
    return default
