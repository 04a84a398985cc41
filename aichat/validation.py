"""Check documents against the JSON Schemas in ``aichat/schemas/`` and describe every problem.

The schemas are the single truth of what a valid file is; this module only turns jsonschema's errors
into messages an operator can act on: the file, the JSON path, the rule broken and, for a misspelt
key, the key that was probably meant.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

#: Keys whose values are secrets, in every configuration file: never echoed, never typed from a placeholder.
SECRET_KEYS = frozenset({"api_key", "token", "admin_tokens", "password", "dsn", "Authorization", "authorization"})


@dataclass(frozen=True, order=True)
class Problem:
    """One thing wrong with a configuration file."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A configuration file cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Return the packaged schema ``aichat/schemas/<name>.schema.json``."""
    text = resources.files("aichat.schemas").joinpath(f"{name}.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    Draft202012Validator.check_schema(schema)
    return schema


def json_path(parts: Any) -> str:
    """Render a jsonschema path deque as ``$.a.b[0]``."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _subschema_at(schema: dict[str, Any], path: Any) -> dict[str, Any]:
    node = schema
    for part in path:
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


def _describe(error: ValidationError, schema: dict[str, Any]) -> list[str]:
    """Messages for one error, naming unknown keys with a "did you mean" hint."""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = sorted(_subschema_at(schema, list(error.absolute_schema_path)[:-1]).get("properties", {}))
        extras = sorted(k for k in error.instance if k not in allowed)
        messages = []
        for key in extras:
            hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else f" (allowed: {', '.join(allowed)})"
            messages.append(f"unknown key {key!r}{suggestion}")
        return messages or [error.message]
    return [error.message]


def secret_values(document: Any, secret_keys: frozenset[str], inside: bool = False) -> set[str]:
    """Every non-empty value found under a key named in ``secret_keys``, at any depth, as the text shown.

    Numbers count too (a YAML ``api_key: 123456`` is a number), as their text and ``repr``.
    """
    found: set[str] = set()
    if isinstance(document, bool):
        return found
    if isinstance(document, int | float):
        if inside:
            found |= {str(document), repr(document)}
    elif isinstance(document, str):
        if inside and document:
            found.add(document)
    elif isinstance(document, dict):
        for key, value in document.items():
            found |= secret_values(value, secret_keys, inside or key in secret_keys)
    elif isinstance(document, list):
        for item in document:
            found |= secret_values(item, secret_keys, inside)
    return found


def redact(text: str, secrets: set[str]) -> str:
    """Replace each secret in ``text`` by ``***``, longest first."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def validate(
    document: Any,
    schema_name: str,
    file: str,
    *,
    secret_keys: frozenset[str] = SECRET_KEYS,
) -> list[Problem]:
    """Return every problem of ``document`` against schema ``schema_name``, sorted by path.

    Values found under keys named in ``secret_keys`` are never echoed in a message.
    """
    secrets = secret_values(document, secret_keys)
    schema = load_schema(schema_name)
    validator = Draft202012Validator(schema)
    problems: set[Problem] = set()
    for error in validator.iter_errors(document):
        leaves = _leaf_errors(error)
        for leaf in leaves:
            path = json_path(leaf.absolute_path)
            for message in _describe(leaf, schema):
                problems.add(Problem(file, path, redact(message, secrets)))
    return sorted(problems)


def _leaf_errors(error: ValidationError) -> list[ValidationError]:
    """For ``oneOf``/``anyOf`` failures, report the errors of the closest branch, not the summary."""
    if error.validator in ("oneOf", "anyOf") and error.context:
        chosen = best_match(error.context)
        if chosen is not None:
            return _leaf_errors(chosen)
    return [error]
