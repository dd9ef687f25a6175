"""Settings loading shared by the controller and the agent: dataclass defaults, a TOML
table, environment variables (<env_prefix><FIELD>) and flags, in increasing order of precedence."""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

ConfigT = TypeVar("ConfigT", bound="DataclassInstance")


def coerce_setting(current: Any, raw: str) -> Any:
    """Parse `raw` (from the environment or a flag) as the type of the `current` value."""
    if isinstance(current, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(current, int):
        return int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, list):
        return [part.strip() for part in raw.split(",") if part.strip()]
    return raw


def load_settings(config_type: type[ConfigT], argv: list[str] | None, *, prog: str,
                  description: str, table: str, env_prefix: str) -> ConfigT:
    """Build a `config_type` from its defaults, the `[table]` table of the --config TOML
    file, `env_prefix`-named environment variables and one flag per field."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", type=Path, help=f"TOML file ([{table}] table)")
    for f in fields(config_type):
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            help=f"(env {env_prefix}{f.name.upper()})")
    args = parser.parse_args(argv)
    config = config_type()
    if args.config:
        values: dict[str, Any] = tomllib.loads(args.config.read_text()).get(table, {})
        for key, value in values.items():
            if not hasattr(config, key):
                parser.error(f"{args.config}: unknown setting {table}.{key}")
            setattr(config, key, value)
    for f in fields(config_type):
        for value in (os.environ.get(f"{env_prefix}{f.name.upper()}"), getattr(args, f.name)):
            if value is not None:
                setattr(config, f.name, coerce_setting(getattr(config, f.name), value))
    return config
