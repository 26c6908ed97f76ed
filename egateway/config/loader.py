"""
Reading the configuration's sources into a L{Config}.

Precedence, lowest first: defaults, the TOML file, the environment, the
command line.  An unknown key or a value that does not parse stops start-up
with a L{ConfigError} that names the key and what is allowed.  What a value
means to its layer is checked afterwards, by that layer
(L{egateway.validation}).
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from typing import Any, Mapping

from egateway.config.schema import (
    _SECTIONS,
    _TABLES,
    Config,
    ConfigError,
    SettingInfo,
    settings,
    table_settings,
)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _from_text(info: SettingInfo, text: str, source: str) -> Any:
    """
    Parse a string from the environment or the command line.
    """
    if info.kind is str:
        return text
    if info.kind is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(
            f"{info.key} ({source}): {text!r} is not a boolean; "
            "use true/false, yes/no, on/off or 1/0"
        )
    if info.kind is list:
        return [item.strip() for item in text.split(",") if item.strip()]
    try:
        return info.kind(text.strip())
    except ValueError:
        raise ConfigError(
            f"{info.key} ({source}): {text!r} is not a valid {info.kind.__name__}"
        ) from None


def _checked(info: SettingInfo, value: Any, source: str) -> Any:
    """
    Validate a value of the right Python type against its declared bounds.
    """
    kind = info.kind
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{info.key} ({source}): expected a list of strings")
    elif kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{info.key} ({source}): expected a table")
    elif not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(
            f"{info.key} ({source}): expected {kind.__name__}, "
            f"got {type(value).__name__}"
        )
    if info.choices is not None and value not in info.choices:
        raise ConfigError(
            f"{info.key} ({source}): {value!r} is not one of {', '.join(info.choices)}"
        )
    if info.minimum is not None and value < info.minimum:
        raise ConfigError(f"{info.key} ({source}): {value} is below {info.minimum}")
    if info.maximum is not None and value > info.maximum:
        raise ConfigError(f"{info.key} ({source}): {value} is above {info.maximum}")
    return value


def load_toml(path: str) -> dict[str, dict[str, Any]]:
    """
    Read a TOML config file into C{{section: {name: value}}}, rejecting
    unknown sections and keys.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    known = {(s.section, s.name) for s in settings()}
    result: dict[str, dict[str, Any]] = {}
    for section, values in data.items():
        if section in _TABLES:
            result[section] = _tables(section, values, f"config file {path}: ")
            continue
        if section not in _SECTIONS:
            raise ConfigError(
                f"config file {path}: unknown section [{section}]; "
                f"known sections: {', '.join([*_SECTIONS, *_TABLES])}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: {section} must be a table")
        for name, value in values.items():
            if (section, name) not in known:
                raise ConfigError(
                    f"config file {path}: unknown key {section}.{name}"
                )
            result.setdefault(section, {})[name] = value
    return result


def _tables(section: str, values: Any, where: str = "") -> dict[str, dict[str, Any]]:
    """
    Check the shape of a table-of-tables section (C{[profiles.<name>]}):
    a table per name, holding only known keys.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}{section} must hold tables, one per name ([{section}.<name>])")
    known = [info.name for info in table_settings(section)]
    result: dict[str, dict[str, Any]] = {}
    for name, table in values.items():
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$", name):
            raise ConfigError(
                f"{where}[{section}.{name}]: a name is 1 to 64 letters, digits, _ . - (starting with a letter or digit)"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}{section}.{name} must be a table ([{section}.{name}])")
        unknown = sorted(key for key in table if key not in known)
        if unknown:
            raise ConfigError(
                f"{where}unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in "
                f"[{section}.{name}]; known keys: {', '.join(known)}"
            )
        result[name] = dict(table)
    return result


def _build_tables(section: str, values: Any) -> dict[str, Any]:
    """
    The dataclasses of a table-of-tables section, each key type-checked.
    """
    kind = _TABLES[section]
    infos = {info.name: info for info in table_settings(section)}
    built: dict[str, Any] = {}
    for name, table in _tables(section, values).items():
        checked = {}
        for key, value in table.items():
            info = dataclasses.replace(infos[key], section=f"{section}.{name}")
            checked[key] = _checked(info, value, "config file")
        built[name] = kind(**checked)
    return built


def build_config(
    file_values: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> Config:
    """
    Merge the sources in precedence order into a validated L{Config}.

    @param file_values: parsed TOML, as from L{load_toml}.
    @param environ: the process environment (defaults to C{os.environ}).
    @param flags: command-line values keyed by flag name (C{max-kernels});
        C{None} values are unset flags.
    """
    environ = os.environ if environ is None else environ
    file_values = file_values or {}
    flags = flags or {}
    chosen: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for info in settings():
        value: Any = dataclasses.MISSING
        if info.name in file_values.get(info.section, {}):
            value = _checked(info, file_values[info.section][info.name], "config file")
        for name in info.env:
            if name in environ:
                value = _checked(info, _from_text(info, environ[name], name), name)
                break
        flag_value = flags.get(info.flag)
        if flag_value is not None:
            value = _checked(
                info, _from_text(info, flag_value, f"--{info.flag}"), f"--{info.flag}"
            )
        if value is not dataclasses.MISSING:
            chosen[info.section][info.name] = value
    if "base_url" in chosen["server"]:
        chosen["server"]["base_url"] = _normalise_base_url(chosen["server"]["base_url"])
    tables = {name: _build_tables(name, file_values.get(name, {})) for name in _TABLES}
    config = Config(**{name: _SECTIONS[name](**values) for name, values in chosen.items()}, **tables)
    return config


def _normalise_base_url(base_url: str) -> str:
    """
    C{fake/path/} and C{/fake/path} both mean C{/fake/path/}.
    """
    return "/" + base_url.strip("/") + "/" if base_url.strip("/") else "/"
