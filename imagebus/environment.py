"""The one reader of the environment: typed getters over IMAGEBUS_* variables.

settings.py names every variable, its default and its rule, and builds each role's
settings through `Environment`; a value that breaks its rule raises `ConfigError`,
naming the variable and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that cannot be used: names the variable (or flag) and the rule."""

    def __init__(self, name: str, rule: str, value: object = None) -> None:
        given = f", got {value!r}" if value is not None else ""
        super().__init__(f"{name}: {rule}{given}")
        self.name = name
        self.rule = rule


class Environment:
    """Typed getters over a mapping of variables (os.environ by default).

    An unset or empty variable gives the default; a set one must follow its rule.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def optional(self, name: str) -> str | None:
        return self._environ.get(name) or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def integer(self, name: str, default: int, *, minimum: int | None = None) -> int:
        return self._parse(name, default, int, "must be an integer", minimum)

    def number(self, name: str, default: float, *, minimum: float | None = None) -> float:
        return self._parse(name, default, float, "must be a number", minimum)

    def flag(self, name: str) -> bool:
        raw = self.optional(name)
        if raw not in (None, "0", "1"):
            raise ConfigError(name, "must be 1 (on) or 0 (off)", raw)
        return raw == "1"

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(name, default)
        if value not in choices:
            raise ConfigError(name, f"must be one of {', '.join(choices)}", value)
        return value

    def _parse(self, name: str, default: T, kind: Callable[[str], T], rule: str, minimum: Any) -> T:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(name, rule, raw) from None
        if minimum is not None and not value >= minimum:  # type: ignore[operator]
            raise ConfigError(name, f"must be at least {minimum:g}", raw)
        return value
