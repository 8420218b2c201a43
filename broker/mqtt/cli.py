"""Turn a settings class into an argparse command line.

Every field becomes ``--field-name`` with the field's description as help, and
its environment twin is ``SLB_FIELD_NAME``. A flag given on the command line
wins over the variable; a variable wins over the default.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, SecretStr, ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def _is_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return get_origin(annotation) is not None and bool in get_args(annotation) and len(get_args(annotation)) <= 2


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """Add one flag per settings field (bools get ``--x/--no-x``)."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    group = parser.add_argument_group("settings (each flag also reads the environment variable shown)")
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = (prefix + name).upper()
        default = field.default if not isinstance(field.default, SecretStr) else "***"
        shown_default = "" if default is None or field.is_required() else f" Default: {default}."
        help_text = f"{field.description or ''}{shown_default} [{env}]"
        if _is_bool(field.annotation):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)


def settings_from_args(settings_cls: type[S], namespace: argparse.Namespace) -> S:
    """Build settings from parsed flags over the environment; exit with a readable message if invalid."""
    overrides: dict[str, Any] = {}
    for name, field in settings_cls.model_fields.items():
        value = getattr(namespace, name, None)
        if value is None:
            continue
        annotation = field.annotation
        if isinstance(value, str) and _wants_json(annotation):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        overrides[name] = value
    try:
        return settings_cls(**overrides)
    except ValidationError as error:
        lines = [f"  --{'-'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}" for e in error.errors()]
        sys.stderr.write("invalid settings:\n" + "\n".join(lines) + "\n")
        raise SystemExit(2) from None


def _wants_json(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin in (list, dict, tuple, set):
        return True
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def parse_settings(
    settings_cls: type[S],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> tuple[S, argparse.Namespace]:
    """Parse ``argv`` into settings; returns the settings and the raw namespace (for extra flags)."""
    parser = parser or argparse.ArgumentParser(prog=prog, description=description)
    add_settings_arguments(parser, settings_cls)
    namespace = parser.parse_args(argv)
    return settings_from_args(settings_cls, namespace), namespace


def configure_logging(level: str = "INFO") -> None:
    """Plain, timestamped logs on stderr."""
    logging.basicConfig(
        level=getattr(logging, str(level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
