"""One job's options made from the configs of the jobs it runs, so that none is declared twice.

``jobs.run_all`` offers each option of its stages once where the stages taking it agree on its default
(``--seed``), and once per stage, prefixed, where they do not or the field is ``per_stage`` (``--top-epochs``).
Help and types come from the stages' fields; each stage's ``__post_init__`` checks the values, its messages
naming the option as run_all spells it.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, ClassVar, Sequence

from pipeline.errors import ConfigError
from pipeline.options import field_help, flag, options_of


@dataclasses.dataclass(frozen=True)
class Stage:
    """A job run by a composed job: its name, its config class, the prefix of its own copy of an
    option the jobs disagree on, and the options the composed job sets itself (not offered)."""

    name: str
    config: type
    prefix: str
    given: tuple[str, ...] = ()

    def options(self) -> dict[str, tuple[dataclasses.Field, Any, bool]]:
        """The options of this job the composed job offers: its field and type, by name."""
        return {n: o for n, o in options_of(self.config).items() if n not in self.given}


def split_options(stages: Sequence[Stage]) -> tuple[dict[str, list[Stage]], dict[str, tuple[Stage, str]]]:
    """(each shared option: the stages taking it; each prefixed option: its stage and field)."""
    owners: dict[str, list[Stage]] = {}
    for stage in stages:
        for name in stage.options():
            owners.setdefault(name, []).append(stage)
    shared, prefixed = {}, {}
    for name, taking in owners.items():
        fields = [s.options()[name][0] for s in taking]
        if len(taking) == 1 or (len({repr(f.default) for f in fields}) == 1
                                and not any(f.metadata.get("per_stage") for f in fields)):
            shared[name] = taking
        else:
            prefixed.update({f"{s.prefix}_{name}": (s, name) for s in taking})
    return shared, prefixed


def _shared_help(name: str, taking: list[Stage]) -> str:
    helps = list(dict.fromkeys(s.options()[name][0].metadata.get("help", "") for s in taking))
    return helps[0] if len(helps) == 1 else "; ".join(f"{s.name}: {h}" for s, h in zip(taking, helps))


def _prefixed_help(stage: Stage, name: str) -> str:
    f = stage.options()[name][0]
    default = "" if f.default is None else f"; default {f.default!r}"
    return f"{stage.name} {flag(name)}: {f.metadata.get('help', '')}{default}"


def _derived(f: dataclasses.Field, default: Any, help: str) -> Any:
    """A composed field for stage field ``f``: its choices and location, this default and help."""
    return field_help(default, help, f.metadata.get("choices"), location=f.metadata.get("location"))


def compose(cls_name: str, base: type, stages: Sequence[Stage]) -> type:
    """A dataclass deriving from ``base`` (the composed job's own options and checks) with one field per option of
    ``stages``: shared ones as the stages declare them, prefixed ones defaulting to None (the stage's own default)."""
    shared, prefixed = split_options(stages)
    own = {f.name for f in dataclasses.fields(base)}
    fields = []
    for name, taking in shared.items():
        if name not in own:
            f = taking[0].options()[name][0]
            tp = typing.get_type_hints(taking[0].config)[name]
            fields.append((name, tp, _derived(f, f.default, _shared_help(name, taking))))
    for key, (stage, name) in prefixed.items():
        f, tp, _ = stage.options()[name]
        fields.append((key, tp | None, _derived(f, None, _prefixed_help(stage, name))))
    cls = dataclasses.make_dataclass(cls_name, fields, bases=(base,), kw_only=True)
    cls.STAGES, cls.SHARED, cls.PREFIXED = tuple(stages), shared, prefixed
    return cls


@dataclasses.dataclass(kw_only=True)
class Composed:
    """The base of a composed config: ``STAGES`` are the jobs it runs, ``SHARED`` and ``PREFIXED``
    its options of theirs (``split_options``); ``compose`` sets them."""

    STAGES: ClassVar[tuple[Stage, ...]] = ()
    SHARED: ClassVar[dict[str, list[Stage]]] = {}
    PREFIXED: ClassVar[dict[str, tuple[Stage, str]]] = {}

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        return next(s for s in self.STAGES if s.name == name)

    def stage_options(self, name: str) -> dict[str, Any]:
        """The options these settings give stage ``name``: every shared one, and its prefixed ones
        that are set (an unset one leaves the stage's default)."""
        stage = self.stage(name)
        out = {n: getattr(self, n) for n in stage.options() if n in self.SHARED}
        prefixed = {n: getattr(self, f"{stage.prefix}_{n}") for n in stage.options() if n not in self.SHARED}
        return {**out, **{n: v for n, v in prefixed.items() if v is not None}}

    def build(self, name: str, options: dict[str, Any]) -> Any:
        """Stage ``name``'s config from ``options``; a ConfigError names the option as spelt here."""
        stage = self.stage(name)
        try:
            return stage.config(**options)
        except ConfigError as exc:
            message = str(exc)
            for key, (s, field) in self.PREFIXED.items():
                if s is stage:
                    message = re.sub(re.escape(flag(field)) + r"(?![\w-])", flag(key), message)
            raise ConfigError(message) from None
