"""Command-line options made from the config's own field definitions.

``nnx train`` and ``nnx sweep`` do not restate a single option: each
``TrainConfig`` field's ``Option`` (help, panel, bounds, choices, parser)
becomes a Typer option here, and the values come back as text that the
field's own parser reads, the same parser ``--set``, ``--grid`` and sweep files
go through. Older option names still found in users' files (the rerun command
in a run's config.json) are accepted as hidden aliases.
"""
from __future__ import annotations

import functools
import inspect
import typing
from dataclasses import MISSING, fields
from typing import Any

import typer

from cli.common import usage_error
from experiments.config import OPTIONS, RENAMED, TrainConfig, apply_recipe
from experiments.errors import ConfigError

KIND_METAVARS = {"int": "INTEGER", "float": "FLOAT", "size": "SIZE", "duration": "DURATION",
                 "hidden": "SIZES", "str": "TEXT"}


def _default(name: str) -> Any:
    f = next(f for f in fields(TrainConfig) if f.name == name)
    return f.default_factory() if f.default is MISSING else f.default


def _metavar(name: str) -> str:
    opt = OPTIONS[name]
    return opt.metavar or ("[" + "|".join(opt.choices) + "]" if opt.choices else KIND_METAVARS[opt.kind])


def _help(name: str, fixed: bool) -> str:
    opt = OPTIONS[name]
    text = opt.help
    if fixed:
        return text
    default = _default(name)
    note = opt.default_help if default is None else opt.format(default)
    # Rich markup: the bracket must be escaped to show literally.
    if opt.kind == "bool":
        note = flag_name(name, default)
    return f"{text} \\[default: {note}]" if note else text


def flag_name(name: str, value: bool) -> str:
    """``--augment`` or ``--no-augment``: how a bool field's value is written."""
    return ("--" if value else "--no-") + name.replace("_", "-")


def _parameter(name: str, fixed: bool) -> inspect.Parameter:
    """The typer option of one config field. ``fixed`` (nnx sweep): every default is
    None, meaning "not fixed"."""
    opt = OPTIONS[name]
    flag = "--" + name.replace("_", "-")
    if opt.kind == "bool":
        # None when not given, as every other option: a recipe fills in what the command
        # line leaves out, and a flag's default must not pass for the user's choice.
        info = typer.Option(None, f"{flag}/--no-{name.replace('_', '-')}", help=_help(name, fixed),
                            rich_help_panel=opt.panel, show_default=False)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                 annotation=bool | None)
    info = typer.Option(None, flag, help=_help(name, fixed), metavar=_metavar(name),
                        rich_help_panel=opt.panel, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=str | None)


def _alias(old: str, new: str) -> inspect.Parameter:
    info = typer.Option(None, "--" + old.replace("_", "-"), hidden=True)
    return inspect.Parameter(f"_alias_{old}", inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=str | None)


def with_config_options(fixed: bool = False):
    """Decorate a command taking ``options: dict`` so that every TrainConfig field is an
    option of it; ``options`` receives the ones given on the command line, as text
    (booleans as bools), keyed by field name."""
    def decorate(command):
        signature = inspect.signature(command)
        hints = typing.get_type_hints(command)     # the command module's names, resolved there
        own = [p.replace(annotation=hints.get(p.name, p.annotation), kind=inspect.Parameter.KEYWORD_ONLY)
               for p in signature.parameters.values() if p.name != "options"]
        generated = [_parameter(name, fixed) for name in OPTIONS]
        aliases = [_alias(old, new) for old, new in RENAMED.items()]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = {}
            for old, new in RENAMED.items():
                value = kwargs.pop(f"_alias_{old}")
                if value is not None:
                    if kwargs.get(new) is not None:
                        raise typer.BadParameter(f"--{old.replace('_', '-')} is the old name of "
                                                 f"--{new.replace('_', '-')}; give it once",
                                                 param_hint=f"'--{new.replace('_', '-')}'")
                    kwargs[new] = value
            for name in OPTIONS:
                value = kwargs.pop(name)
                if value is not None:
                    options[name] = value
            return command(options=options, **kwargs)

        parameters = generated + aliases + own
        wrapper.__signature__ = signature.replace(parameters=parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__        # typer must see the new signature, not the command's
        return wrapper
    return decorate


def parse_options(options: dict[str, Any]) -> dict[str, Any]:
    """Command-line values -> typed field values, each by its field's parser.
    Raises ConfigError naming the option."""
    return {name: value if isinstance(value, bool) else OPTIONS[name].parse(name, value)
            for name, value in options.items()}


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The config the command line asks for, a recipe's values filling the options not
    given (unresolved: data set defaults still None)."""
    return TrainConfig(**apply_recipe(parse_options(options)))


def config_option(name: str, help: str | None = None, **kwargs):
    """A command's own option that takes a value of the config field ``name`` (the data
    set of ``nnx evaluate``, the seed of a plot): the field's flag and metavar, and
    text for its parser (``parse_option``); ``help`` replaces the field's help."""
    return typer.Option(None, "--" + name.replace("_", "-"), help=help or OPTIONS[name].help,
                        metavar=_metavar(name), show_default=False, **kwargs)


def parse_option(name: str, text: str | None) -> Any:
    """``text`` (None passes) by the field's own parser; a bad value is a usage error."""
    if text is None:
        return None
    try:
        return OPTIONS[name].parse(name, text)
    except ConfigError as exc:
        raise usage_error(exc) from None
