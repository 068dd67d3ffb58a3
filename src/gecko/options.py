"""Command-line options derived from config dataclasses, as Tevatron's argument dataclasses do: a
field's default and its help (`option(default, help)`) are written once, so a new field appears in
the YAML config and on the command line alike. `given` reads the options back as the fields."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def option(default=dataclasses.MISSING, help: str = "", **cli):
    """A dataclass field with its help (`cli`: argparse settings, e.g. choices; `cli=False`: no option)."""
    factory = dataclasses.MISSING
    if isinstance(default, list):
        default, factory = dataclasses.MISSING, list
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help, **cli})


def numbers(kind: type):
    """An argparse type for comma- or space-separated numbers, e.g. 384,256,128,64."""

    def parse(text: str) -> list:
        return [kind(v) for v in text.replace(",", " ").split()]

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _shown(value) -> str:
    """A default as the help names it; empty when there is nothing to name."""
    if value in (None, dataclasses.MISSING) or isinstance(value, (bool, tuple, list)):
        return ""
    return f" (default {value:g})" if isinstance(value, float) else f" (default {value})"


def add_options(parser, cls, names=None, *, prefix: str = "", layered: bool = False, **settings) -> None:
    """One option per field of the dataclass `cls` (`names`, or every field not marked cli=False).

    Flag, type, choices and help come from the field and its metadata; `settings[name]` (a help
    string or argparse settings) adds to them, for a class that keeps none. The default is the
    field's (or `settings[name]["default"]`) and the help names it; `layered`: the option's default
    is None, so a value from a config file stands unless the option is given (see `given`).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in names or [n for n, f in fields.items() if f.metadata.get("cli", True)]:
        f, extra = fields[name], settings.get(name, {})
        kw = {**f.metadata, **({"help": extra} if isinstance(extra, str) else extra)}
        kw.pop("cli", None)
        fixed = "default" in kw  # an option whose default is its own, layered or not
        default = kw.pop("default", _default(f))
        hint = hints[name]
        if type(None) in typing.get_args(hint):  # Optional[X]: X
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        flag = kw.pop("flag", None)
        if hint is bool:
            flag = flag or (f"--no-{prefix}{name}" if default else f"--{prefix}{name}").replace("_", "-")
            kw.update(action="store_const", const=not default)
        else:
            origin = typing.get_origin(hint)
            element = typing.get_args(hint)[0] if origin in (list, tuple) else hint
            if origin is list and "type" not in kw:  # else `type` parses the whole list
                kw["action"] = "append"
            elif origin is tuple and "type" not in kw:
                kw["nargs"] = "+"
            kw.setdefault("type", element if element in (int, float) else str)
            kw["help"] = (kw.get("help", "") + ("" if "default" in kw.get("help", "") else _shown(default))).strip()
        flag = flag or f"--{prefix}{name}".replace("_", "-")
        parser.add_argument(flag, dest=prefix.replace("-", "_") + name, default=None if layered and not fixed else default,
                            **{k: v for k, v in kw.items() if v != ""})


def given(args: argparse.Namespace, cls, prefix: str = "") -> dict:
    """The fields of `cls` that `args` holds a value for (None: not given, the dataclass's default applies)."""
    out = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            out[f.name] = tuple(value) if isinstance(_default(f), tuple) and isinstance(value, list) else value
    return out
