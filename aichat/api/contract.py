"""The HTTP API's contract: the OpenAPI 3.1 document kept in the package, and the checks made from it.

``aichat/schemas/openapi.json`` describes every route Klein serves (``tests/test_openapi.py`` holds the two
to each other). JSON request bodies are checked against the document's schema for their route before a
handler looks at them, so a violation is a 400 whose message names the field (``param`` on the OpenAI face).
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from klein.interfaces import IKleinRequest
from twisted.web.iweb import IRequest

from aichat.api.errors import BadRequest

#: A Klein (werkzeug) rule's ``<converter:name>`` placeholder.
_PLACEHOLDER = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def template(rule: str) -> str:
    """A Klein rule as an OpenAPI path template: ``/v1/chat/sessions/<string:id>`` is ``/v1/chat/sessions/{id}``."""
    return _PLACEHOLDER.sub(r"{\1}", rule)


@functools.cache
def document_bytes() -> bytes:
    """The OpenAPI document as shipped."""
    return resources.files("aichat.schemas").joinpath("openapi.json").read_bytes()


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document, parsed."""
    parsed: dict[str, Any] = json.loads(document_bytes())
    return parsed


@functools.cache
def _validator(path: str, method: str) -> Draft202012Validator | None:
    operation = document()["paths"].get(path, {}).get(method.lower())
    if operation is None:
        return None
    schema = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
    if schema is None:
        return None
    # ``$ref``s point into the document's components.
    return Draft202012Validator({**schema, "components": document()["components"]})


def matched_template(request: IRequest) -> str | None:
    """The path template of the route Klein matched for ``request``, or ``None``."""
    mapper = getattr(IKleinRequest(request, None), "mapper", None)
    if mapper is None:
        return None
    try:
        rule, _ = mapper.match(return_rule=True)
    except Exception:  # werkzeug's NotFound, MethodNotAllowed, RequestRedirect
        return None
    return template(rule.rule)


def _field(error: ValidationError) -> str:
    """Where ``error`` is, as the OpenAI face names a parameter: ``messages[0].role``."""
    where = ""
    for part in error.absolute_path:
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    if error.validator == "required" and isinstance(error.instance, dict):
        required: list[str] = list(error.schema.get("required", [])) if isinstance(error.schema, dict) else []
        missing = next((name for name in required if name not in error.instance), "")
        where = f"{where}.{missing}" if where else missing
    return where


_TYPES = {"string": "a string", "boolean": "true or false", "integer": "an integer", "number": "a number",
          "object": "an object", "array": "an array"}


def _message(error: ValidationError, name: str) -> str:
    if error.validator == "required":
        return f"Invalid request format: field {name!r} is required"
    if error.validator == "type":
        expected: Any = error.validator_value
        kinds: list[str] = [expected] if isinstance(expected, str) else list(expected)
        shown = " or ".join(_TYPES.get(kind, kind) for kind in kinds if kind != "null")
        return f"Invalid request format: field {name!r} must be {shown}"
    return f"Invalid request format: field {name!r}: {error.message}"


#: The schema keywords whose violations are answered here.
CHECKED = frozenset({"type", "required"})


class SchemaViolation(BadRequest):
    """A body that breaks its route's schema; ``param`` is the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_body(request: IRequest, body: dict[str, Any]) -> None:
    """Raise :class:`SchemaViolation` when ``body`` breaks the schema of the route ``request`` matched."""
    path = matched_template(request)
    if path is None:
        return
    validator = _validator(path, request.method.decode("latin-1"))
    if validator is None:
        return
    # Types and required fields are checked here; finer rules (a blank title, n other than 1, ...) are left to
    # the handler, which says what it needs in its own words (the status is a 400 either way).
    errors = [e for e in validator.iter_errors(body) if e.validator in CHECKED]
    error = min(errors, key=lambda e: (len(e.absolute_path), str(e.absolute_path)), default=None)
    if error is not None:
        name = _field(error)
        raise SchemaViolation(_message(error, name), name)
