"""How a job's options are declared, checked, read and written: the machinery under ``pipeline.config``.

A job's options are the fields of its dataclass, each with ``field_help``'s help text and choices;
``parse_config`` builds an ``argparse`` parser from it (``--help`` lists every option, a ``--config``
file supplies any, the command line wins) and ``__post_init__`` validates before any work starts.

Not jsonargparse or tyro (issue 27): both would rename today's options (``--data_dir``, ``--top.epochs``),
take help from docstrings and replace the ``--no-<flag>`` booleans, to save only the parser loop and
config file here (about 60 lines); ``pipeline.compose`` would still be ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from pipeline.data import storage
from pipeline.errors import ConfigError, UserError
from pipeline.redact import MASK, redact, redact_values

T = TypeVar("T")
CONFIG_FILE = "config.yaml"


def field_help(default: Any, help: str, choices: Sequence[str] | None = None, per_stage: bool = False,
               location: str | None = None, **kw: Any) -> Any:
    """A dataclass field carrying its CLI help text and allowed choices. ``per_stage``: jobs.run_all offers it once per
    stage even where the stages' defaults agree (a learning rate for RMSprop means nothing to SGD). ``location``: what
    the value names (``pipeline.prechecks.LOCATIONS``), checked by the job's preflight, since configs do no I/O."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "per_stage": per_stage,
                                                        "location": location}, **kw)


def flag(name: str) -> str:
    """The command-line spelling of field ``name``."""
    return "--" + name.replace("_", "-")


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    """Raise ConfigError naming the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ConfigError(f"{flag(name)} must be one of {', '.join(allowed)}; got {value!r}")


def check_choices(cfg: Any) -> None:
    """``check_choice`` for every field of ``cfg`` declared with choices (``field_help``)."""
    for f in dataclasses.fields(cfg):
        if f.metadata.get("choices"):
            check_choice(f.name, getattr(cfg, f.name), f.metadata["choices"])


def check_at_least(name: str, value: int | None, low: int, why: str = "") -> None:
    """Raise ConfigError unless ``value`` is at least ``low``; ``why`` (the limit's reason) goes into the message."""
    if value is None or value < low:
        raise ConfigError(f"{flag(name)} must be an integer of at least {low}{why}; got {value!r}")


def check_positive(name: str, value: float | None, allow_none: bool = False) -> None:
    """Raise ConfigError unless ``value`` is > 0 (or None when allowed)."""
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ConfigError(f"{flag(name)} must be a positive number; got {value!r}")


def check_range(name: str, value: float, low: float, high: float, open_low: bool = False, open_high: bool = False) -> None:
    """Raise ConfigError unless ``value`` lies between ``low`` and ``high``."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{flag(name)} must be in {interval}; got {value!r}")


def base_type(tp: Any) -> tuple[Any, bool]:
    """The non-None member of ``Optional[X]`` and whether None was allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def options_of(cls: type) -> dict[str, tuple[dataclasses.Field, Any, bool]]:
    """Each option of config class ``cls``: its field, its type (Optional unwrapped) and whether it takes None."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, *base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None (the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(cls: type, description: str, defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field of ``cls`` and ``--config``;
    ``defaults`` (a config file's values) replace the fields' defaults."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_Help)
    parser.add_argument("--config", metavar="FILE", help=f"YAML file of options (as the {CONFIG_FILE} every run "
                                                         f"writes beside its outputs); options given here win")
    defaults = defaults or {}
    for name, (f, tp, _) in options_of(cls).items():
        help_text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            help_text += f" (one of: {', '.join(f.metadata['choices'])})"
        default = defaults.get(name, f.default)
        if default is dataclasses.MISSING:
            parser.add_argument(flag(name), type=tp, required=True, help=help_text, metavar=name.upper())
        elif tp is bool:
            parser.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            # choices are checked in __post_init__ (check_choices): the same message from the CLI, a file or Python.
            parser.add_argument(flag(name), type=tp, default=default, help=help_text, metavar=name.upper())
    return parser


def read_config(path: str, cls: type) -> dict[str, Any]:
    """The options of ``cls`` a YAML config file sets (keys spelt ``data_dir`` or ``data-dir``);
    ConfigError for a key ``cls`` has no option for, or a value of the wrong type."""
    try:
        values = yaml.safe_load(storage.read_text(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--config {path!r} cannot be read: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of option: value")
    known = options_of(cls)
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path!r}: {key!r} is not an option of this job; the options are "
                              f"{', '.join(sorted(known))}")
        out[name] = _typed(name, value, known[name][1], known[name][2], path)
    return out


def _typed(name: str, value: Any, tp: Any, optional: bool, path: str) -> Any:
    """``value`` as type ``tp`` (an int, or a string such as YAML's ``1e-4``, where a float is
    wanted becomes a float), else ConfigError; None only where the option takes it."""
    if value is None and optional or isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    article = "an" if tp.__name__[0] in "aeiou" else "a"
    raise ConfigError(f"--config {path!r}: {name} must be {article} {tp.__name__}{' or null' if optional else ''}; "
                      f"got {value!r}")


def parse_config(cls: type[T], argv: Sequence[str] | None, description: str) -> T:
    """Parse ``argv`` (and the ``--config`` file it names) into ``cls``; invalid values exit with
    status 2 and a message."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    try:
        given = pre.parse_known_args(argv)[0].config
        defaults = read_config(given, cls) if given else {}
    except UserError as exc:
        build_parser(cls, description).error(redact(str(exc)))
    parser = build_parser(cls, description, defaults)
    args = vars(parser.parse_args(argv))
    args.pop("config")
    masked = [flag(n) for n in defaults if isinstance(args[n], str) and MASK in args[n]]
    if masked:
        parser.error(f"--config {given!r}: {', '.join(masked)} hold(s) a credential the file has redacted "
                     f"({MASK}); give {', '.join(masked)} on the command line")
    try:
        return cls(**args)
    except UserError as exc:
        parser.error(redact(str(exc)))


def resolved(cfg: Any, **overrides: Any) -> dict[str, Any]:
    """``cfg``'s options as a config file holds them, with the values a job resolved (``overrides``)."""
    return {**{name: getattr(cfg, name) for name in options_of(type(cfg))}, **overrides}


def write_resolved(directory: str, job: str, cfg: Any, **overrides: Any) -> None:
    """Write ``<directory>/config.yaml``: ``cfg`` with the values the job resolved (``overrides``)."""
    write_config(storage.join(directory, CONFIG_FILE), job, resolved(cfg, **overrides))


def write_config(uri: str, job: str, values: Mapping[str, Any]) -> None:
    """Write a run's resolved options to ``uri`` as a YAML file that ``--config`` reads back. Passwords and tokens in
    URIs are redacted: such an option must be given again on the command line (reading the file back says so)."""
    header = f"# python -m jobs.{job} --config <this file> runs again with these settings\n"
    storage.write_text(uri, header + yaml.safe_dump(redact_values(dict(values)), sort_keys=False))
