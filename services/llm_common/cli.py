"""Command lines derived from settings classes: every setting is declared once, as a `Field`.

    flags = parse_flags(EngineSettings, argv, "llm-engine", "Serve a checkpoint over gRPC.")
    settings = resolve(EngineSettings, flags, "llm-engine")

`parse_flags` makes each field a flag with pydantic-settings' `CliSettingsSource`: `max_queue`
is `--max-queue`, a bool is `--compile/--no-compile`, a list flag repeats or takes commas
(`--x a --x b` or `--x a,b`) unless it is marked `Verbatim`, a nested section's field is
`--section.field`, and the help is the field's `description`. It returns only the flags
given, so `resolve` builds the settings with flags > environment (the class's `env_prefix`,
e.g. `LLM_ENGINE_MAX_QUEUE`) > defaults. An unknown flag exits 2 (argparse); a bad value,
from a flag or the environment, exits 2 with a line naming the field, its flag and its
variable, and never prints a secret's value.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection, Sequence
from typing import Any, NoReturn, TypeVar, get_args

from pydantic import BaseModel, SecretBytes, SecretStr, ValidationError, create_model
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsError

S = TypeVar("S", bound=BaseSettings)


class Verbatim:
    """Field metadata, `Annotated[list[str], Verbatim]`: each flag is one item, taken whole.

    pydantic-settings otherwise reads a list flag's value as a list of its own (split at
    commas, JSON-ish brackets), which would cut `--set finetune.targets=q_proj,v_proj`."""


def flags_of(
    name: str, doc: str, *parts: tuple[type[BaseSettings], Collection[str]]
) -> type[BaseSettings]:
    """A settings class holding the fields of several settings classes, each part a class
    and the fields of it left out: the flags of one command over several services (it is
    parsed, never built). A field two parts share is declared by the first; their
    `cli_shortcuts` add up."""
    fields: dict[str, Any] = {}
    shortcuts: dict[str, Any] = {}
    for model, exclude in parts:
        shortcuts |= model.model_config.get("cli_shortcuts") or {}
        for field, info in model.model_fields.items():
            if field not in exclude and field not in fields:
                fields[field] = (info.annotation, info)
    base = type(f"{name}Base", (BaseSettings,), {"model_config": {"cli_shortcuts": shortcuts}})
    return create_model(name, __base__=base, __doc__=doc, **fields)


def parse_flags(
    model: type[BaseSettings], argv: Sequence[str] | None, prog: str, description: str
) -> dict[str, Any]:
    """The flags in `argv` (default: `sys.argv[1:]`) as init values of `model`, only those
    given. `--help` prints every field and exits 0; an unknown flag exits 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    verbatim = [name for name, f in model.model_fields.items() if Verbatim in f.metadata]
    kept: dict[str, list[str]] = {}

    def parse_args(parser: argparse.ArgumentParser, args: list[str]) -> argparse.Namespace:
        namespace = parser.parse_args(args)
        for name in verbatim:
            if (values := getattr(namespace, name, None)) is not None:
                kept[name] = values
                setattr(namespace, name, None)  # so the source does not split it
        return namespace

    parser = argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    try:
        flags = CliSettingsSource(
            model, root_parser=parser, parse_args_method=parse_args, cli_parse_args=argv,
            cli_kebab_case=True, cli_implicit_flags=True, cli_avoid_json=True,
            cli_hide_none_type=True,
        )()  # fmt: skip
    except SettingsError as e:  # a list flag that does not parse
        fail(prog, f"invalid flags: {e}")
    return {**flags, **kept}


def resolve(model: type[S], flags: dict[str, Any], prog: str, exclude: Collection[str] = ()) -> S:
    """`model` built from `flags` (those of its fields, but `exclude`), its environment and
    its defaults; on a bad value, exit 2 naming the field."""
    given = {k: v for k, v in flags.items() if k in model.model_fields and k not in exclude}
    try:
        return model(**given)
    except ValidationError as e:
        fail(prog, format_errors(model, e))
    except SettingsError as e:  # an environment variable that does not decode
        fail(prog, f"invalid settings: {e}")


def fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def format_errors(model: type[BaseModel], e: ValidationError) -> str:
    """One line per error, `field: message (got value) [--flag, ENV_VAR]`, the value left
    out where the field may hold a secret."""
    lines = []
    for err in e.errors():
        loc = err["loc"]
        if not loc:  # a check across fields (a model validator) names them itself
            lines.append(f"  {err['msg']}")
            continue
        path, secret = _field_path(model, loc)
        shown = not secret and err["type"] != "missing"  # a missing field's input: all of them
        got = f" (got {err['input']!r})" if shown else ""
        names = ""
        if path and (len(path) == len(loc) or isinstance(loc[len(path)], int)):  # a field's
            names = " [" + ", ".join(["--" + ".".join(path).replace("_", "-"),
                                      *_env_name(model, path)]) + "]"  # fmt: skip
        lines.append(f"  {'.'.join(map(str, loc))}: {err['msg']}{got}{names}")
    return "invalid settings:\n" + "\n".join(lines)


def _env_name(model: type[BaseModel], path: list[str]) -> list[str]:
    """The field's environment variable; none for a class without a prefix (flags only)."""
    prefix = model.model_config.get("env_prefix")
    nested = model.model_config.get("env_nested_delimiter") or "__"
    return [prefix + nested.join(path).upper()] if prefix else []


def _field_path(model: type[BaseModel], loc: tuple[int | str, ...]) -> tuple[list[str], bool]:
    """The field names leading `loc` (a section, then its field), and whether what they
    name may hold a secret (an unknown field: whether its section may)."""
    path: list[str] = []
    current: Any = model
    for part in loc:
        is_model = isinstance(current, type) and issubclass(current, BaseModel)
        fields = current.model_fields if is_model else {}
        if part not in fields:
            break
        path.append(str(part))
        current = fields[part].annotation
    return path, _holds_secret(current)


def _holds_secret(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, SecretStr | SecretBytes):
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return any(_holds_secret(arg) for arg in get_args(annotation))
