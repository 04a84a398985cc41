"""The OpenAPI document against the routes Klein serves, and request bodies checked against its schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq

from aichat.api import build_resource
from aichat.api.contract import document, template
from tests.support import build_api, inline_store, make_settings

METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


def served(tmp_path: Path) -> set[tuple[str, str]]:
    settings = make_settings(tmp_path)
    api, _ = build_api(settings, inline_store(str(tmp_path / "a.db")))
    routes = set()
    for rule in api.app.url_map.iter_rules():
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((template(rule.rule), method.lower()))
    return routes


def test_every_route_is_documented_and_every_documented_route_is_served(tmp_path: Path) -> None:
    """A route Klein serves but the document lacks, or one the document names but Klein lacks, fails here."""
    documented = {
        (path, method) for path, item in document()["paths"].items() for method in item if method in METHODS
    }
    routes = served(tmp_path)
    assert routes - documented == set(), "served but not documented"
    assert documented - routes == set(), "documented but not served"
    assert ("/v1/chat/completions", "post") in routes and ("/v1/models/{model}", "get") in routes


def test_document_is_openapi_31_and_its_refs_resolve() -> None:
    """Every ``$ref`` names a schema of the document's components."""
    doc = document()
    assert doc["openapi"].startswith("3.1")
    text = json.dumps(doc)
    for ref in {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}:
        assert ref in doc["components"]["schemas"], ref


def test_body_violations_are_400s_naming_the_field(tmp_path: Path) -> None:
    """A body of the wrong shape is refused before the handler, in each face's error shape."""
    settings = make_settings(tmp_path, "auth:\n  tokens:\n    - {token: 'abcdefghijklmnop0123', user_id: 7}\n")
    api, _ = build_api(settings, inline_store(str(tmp_path / "b.db")))
    client: Any = StubTreq(build_resource(api))
    headers = {"Content-Type": "application/json", "Authorization": "Bearer abcdefghijklmnop0123"}

    def post(path: str, body: object) -> tuple[int, dict[str, Any]]:
        response = client.post("http://x" + path, json.dumps(body).encode(), headers=headers)
        client.flush()
        answer = response.result
        content = client.content(answer)
        client.flush()
        return answer.code, json.loads(content.result)

    status, body = post("/v1/chat/approvals/abc", {"approve": "yes"})
    assert (status, body["error"]) == (400, "Invalid request format: field 'approve' must be true or false")
    status, body = post("/v1/chat/sessions", {"title": 12})
    assert (status, body["error"]) == (400, "Invalid request format: field 'title' must be a string")
    status, body = post("/v1/chat/completions", {"model": "m", "messages": [{"content": "hi"}]})
    assert status == 400
    assert body["error"]["param"] == "messages[0].role"
    assert "is required" in body["error"]["message"]
