"""The names of the server's settings: each one's flag and QUORUM_* variable, and the old names kept.

A setting's flag is its field name with dashes, less the `_s` of a duration in seconds
(`poll_interval_s` -> `--poll-interval`), and its variable is `QUORUM_` plus the flag's name
upper-cased with dashes as underscores (`QUORUM_POLL_INTERVAL`). Before issue 35 the variable
was `QUORUM_` plus the field name (`QUORUM_POLL_INTERVAL_S`): those old names still work and
are reported as deprecated; any other `QUORUM_*` variable names no setting and is refused.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

PREFIX = "QUORUM_"


def flag_name(field: str) -> str:
    """"poll_interval_s" -> "poll-interval" (without the leading dashes)."""
    return field.removesuffix("_s").replace("_", "-")


def env_name(field: str) -> str:
    """"poll_interval_s" -> "QUORUM_POLL_INTERVAL": the flag's name, as a variable."""
    return PREFIX + flag_name(field).upper().replace("-", "_")


def old_env_name(field: str) -> str | None:
    """The variable's name before issue 35 ("QUORUM_POLL_INTERVAL_S"), where it differs."""
    old = PREFIX + field.upper()
    return None if old == env_name(field) else old


class UnknownSettings(ValueError):
    """QUORUM_* variables that name no setting (the message names the closest matches)."""


def field_environment(fields: Iterable[str], environ: Mapping[str, str]) -> dict[str, str]:
    """Each field's value from the environment, keyed "QUORUM_<FIELD>" as pydantic-settings
    reads it: the current name wins over the old one. Case-insensitive, as pydantic-settings is."""
    upper = {key.upper(): value for key, value in environ.items() if key.upper().startswith(PREFIX)}
    values = {}
    for field in fields:
        for name in (env_name(field), old_env_name(field)):
            if name is not None and name in upper:
                values[PREFIX + field.upper()] = upper[name]
                break
    return values


def check_environment(fields: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """Deprecation warnings for old names in `environ` (one line each); raises UnknownSettings
    for QUORUM_* variables that name no setting, with the closest setting's variable."""
    fields = list(fields)
    current = {env_name(f): f for f in fields}
    old = {name: f for f in fields if (name := old_env_name(f)) is not None}
    warnings, unknown = [], []
    for key in sorted(environ):
        if not key.startswith(PREFIX) or key in current:
            continue
        if key in old:
            new = env_name(old[key])
            if new in environ:
                warnings.append(f"{key} is deprecated and ignored: {new} is set too and wins")
            else:
                warnings.append(f"{key} is deprecated: rename it {new} (the flag --{flag_name(old[key])})")
            continue
        # Compared without the prefix, which every name shares and would make any two look alike.
        close = difflib.get_close_matches(key.removeprefix(PREFIX), [n.removeprefix(PREFIX) for n in current], n=1)
        unknown.append(f"{key} names no setting" + (f" (did you mean {PREFIX}{close[0]}?)" if close else ""))
    if unknown:
        raise UnknownSettings("; ".join(unknown) + "; `quorum serve --help` lists every setting and its variable")
    return warnings
