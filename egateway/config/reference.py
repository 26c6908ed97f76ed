"""
The configuration described for people: the effective values for the log,
C{--help}, and the README's reference table (C{python -m egateway.config}).
"""

from __future__ import annotations

import textwrap
from typing import Any

from egateway.config.schema import _SECTIONS, _TABLES, Config, settings, table_settings


def describe(config: Config) -> dict[str, dict[str, Any]]:
    """
    The effective configuration as plain data, secrets masked, for logs.
    """
    result: dict[str, dict[str, Any]] = {}
    for info in settings():
        value = getattr(getattr(config, info.section), info.name)
        if info.secret and value:
            value = "********"
        result.setdefault(info.section, {})[info.name] = value
    for table in _TABLES:
        # Names only: a profile's environment may hold credentials.
        result[table] = {name: "defined" for name in getattr(config, table)}
    return result


def flag_table() -> list[tuple[str, None, None, str]]:
    """
    Rows for C{twisted.python.usage.Options.optParameters}: one per setting.
    """
    rows = []
    for info in settings():
        env = f" [env: {', '.join(info.env)}]" if info.env else ""
        rows.append((info.flag, None, None, f"{info.help}{env}"))
    return rows


def help_text(width: int = 100) -> str:
    """
    Every setting's flag for C{--help}, grouped by section (the TOML table
    it lives in), each with its default and environment variables.
    """
    lines = []
    for section in _SECTIONS:
        lines.append(f"[{section}]")
        for info in settings():
            if info.section != section:
                continue
            default = info.default
            if isinstance(default, bool):
                default = str(default).lower()
            elif isinstance(default, list):
                default = ",".join(default)
            shown = "(empty)" if default in ("", []) else default
            if info.secret and default:
                shown = "********"
            env = f"; env {', '.join(info.env)}" if info.env else ""
            lines.append(f"  --{info.flag}=  [default: {shown}{env}]")
            lines.extend(
                textwrap.wrap(
                    info.help,
                    width=width,
                    initial_indent="      ",
                    subsequent_indent="      ",
                )
            )
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """
    The configuration reference as a Markdown table (the README embeds it;
    a test keeps the two equal).
    """
    lines = [
        "| setting (TOML `[section] key`) | flag | environment | default | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for info in settings():
        default = info.default
        if isinstance(default, list):
            default = ",".join(default)
        shown = f"`{default}`" if default not in ("", []) else "(empty)"
        env = ", ".join(f"`{name}`" for name in info.env) or "-"
        lines.append(
            f"| `[{info.section}] {info.name}` | `--{info.flag}` | {env} | {shown} | {info.help} |"
        )
    for table in _TABLES:
        lines += [
            "",
            f"Keys of each `[{table}.<name>]` table (config file only):",
            "",
            "| key | default | meaning |",
            "| --- | --- | --- |",
        ]
        for info in table_settings(table):
            default = info.default
            shown = f"`{default}`" if default not in ("", [], {}) else "(empty)"
            lines.append(f"| `{info.name}` | {shown} | {info.help} |")
    return "\n".join(lines) + "\n"
