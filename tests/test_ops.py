"""Operations endpoints: /health, /openapi.json, offline /docs, Prometheus /metrics, unknown routes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from harness import Api, ServerProcess, Tenant, json_of

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def test_health(anonymous: Api) -> None:
    response = anonymous.get("/health")
    assert response.status_code == 200
    body = json_of(response)
    assert body["status"] == "pass"
    assert body["service"] == "pilotboat"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", body["version"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, ref
        node = node[part]
    return node


def test_openapi_document(anonymous: Api) -> None:
    response = anonymous.get("/openapi.json")
    assert response.status_code == 200
    document = json_of(response)
    assert re.fullmatch(r"3\.\d+\.\d+", document["openapi"])
    assert document["info"]["title"] == "Pilotboat"
    assert document["info"]["version"] == anonymous.get("/health").json()["version"]
    paths = document["paths"]
    for required in (
        "/api/v1/orgs", "/api/v1/orgs/{org_id}", "/api/v1/orgs/{org_id}/users", "/api/v1/auth/token", "/api/v1/api-keys",
        "/api/v1/orgs/{org_id}/events", "/api/v1/events", "/{domain_id}/clients/configs", "/things/configs",
        "/clients/bootstrap/{external_id}", "/things/bootstrap/{external_id}", "/health", "/metrics",
    ):
        assert required in paths, required
    assert {"get", "post"} <= set(paths["/api/v1/orgs"])
    assert {"get", "post"} <= set(paths["/{domain_id}/clients/configs"])
    assert {"get", "post"} <= set(paths["/things/configs"])
    assert "/docs" not in paths and not any(path.startswith("/static") for path in paths)

    operation_ids = []
    for path, item in paths.items():
        assert path.startswith("/"), path
        operations = {method: op for method, op in item.items() if method in HTTP_METHODS}
        assert operations, path
        for method, operation in operations.items():
            assert operation.get("responses"), (method, path)
            for code in operation["responses"]:
                assert re.fullmatch(r"[1-5]\d\d|[1-5]XX|default", code), (method, path, code)
            operation_ids.append(operation["operationId"])
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "path":
                    assert "{" + parameter["name"] + "}" in path, (path, parameter["name"])
                    assert parameter.get("required") is True
            for name in re.findall(r"\{([^}]+)\}", path):
                declared = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
                assert name in declared, (method, path, name)
    assert len(operation_ids) == len(set(operation_ids)), "operationId values must be unique"
    for ref in set(_refs(document)):
        _resolve(document, ref)

    token = paths["/api/v1/auth/token"]["post"]
    assert "application/x-www-form-urlencoded" in token["requestBody"]["content"]
    schemes = document["components"]["securitySchemes"]
    assert any(scheme.get("type") == "http" and scheme.get("scheme") == "bearer" for scheme in schemes.values())


def test_docs_are_served_without_a_cdn(anonymous: Api) -> None:
    response = anonymous.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert "swagger-ui" in html.lower()
    assert "/openapi.json" in html
    assert not re.search(r"https?://", html), "the docs page must not load anything from another host"
    assert "//cdn" not in html and "unpkg" not in html and "jsdelivr" not in html
    assets = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert any(asset.endswith(".js") for asset in assets) and any(asset.endswith(".css") for asset in assets)
    expected_types = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
    for asset in assets:
        assert asset.startswith("/static/swagger-ui/"), asset
        loaded = anonymous.get(asset)
        assert loaded.status_code == 200, asset
        assert len(loaded.content) > 100, asset
        suffix = asset[asset.rfind("."):]
        assert expected_types[suffix] in loaded.headers["content-type"], (asset, loaded.headers["content-type"])
    assert anonymous.get("/static/swagger-ui/no-such-file.js").status_code == 404
    # Only the bundled assets are served: no way out of their folder.
    for escape in ("%2e%2e/__init__.py", "%2e%2e/%2e%2e/swagger_ui_bundle/__init__.py", "..%2f__init__.py"):
        assert anonymous.get(f"/static/swagger-ui/{escape}").status_code == 404, escape


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _requests(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str, route: str, status: str) -> float:
    key = ("pilotboat_http_requests_total", (("method", method), ("route", route), ("status", status)))
    return samples.get(key, 0.0)


def _metrics(anonymous: Api) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text, _samples(response.text)


def test_metrics_count_requests_by_route(anonymous: Api, tenant: Tenant) -> None:
    tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices")
    _, before = _metrics(anonymous)
    route = "/api/v1/orgs/{org_id}/devices"
    for _ in range(3):
        assert tenant.viewer.get(f"/api/v1/orgs/{tenant.org_id}/devices").status_code == 200
    assert tenant.viewer.post(f"/api/v1/orgs/{tenant.org_id}/devices", json={"name": "x"}).status_code == 403
    missing = f"/no-such-route-{uuid.uuid4().hex}"
    assert anonymous.get(missing).status_code == 404

    text, after = _metrics(anonymous)
    assert "# TYPE pilotboat_http_requests_total counter" in text
    assert "pilotboat_http_requests_total{" in text
    assert "pilotboat_http_request_seconds_bucket{" in text
    assert _requests(after, "GET", route, "200") >= _requests(before, "GET", route, "200") + 3
    assert _requests(after, "POST", route, "403") >= _requests(before, "POST", route, "403") + 1
    assert _requests(after, "GET", "unmatched", "404") >= _requests(before, "GET", "unmatched", "404") + 1
    # Labels carry route templates, never raw paths (ids would explode the number of series).
    assert tenant.org_id not in text
    assert missing not in text
    latency = ("pilotboat_http_request_seconds_count", (("method", "GET"), ("route", route)))
    assert after[latency] >= before.get(latency, 0.0) + 3


def test_unknown_routes_are_json_404(server: ServerProcess) -> None:
    cases = {
        f"/api/v1/{uuid.uuid4().hex}": "detail",
        f"/api/v1/orgs/{uuid.uuid4()}/nothing-here": "detail",
        f"/{uuid.uuid4().hex}": "message",
        f"/things/{uuid.uuid4().hex}/x/y": "error",
    }
    for path, key in cases.items():
        response = httpx.get(server.url + path, timeout=30)
        assert response.status_code == 404, path
        body = json_of(response)
        assert isinstance(body.get(key), str) and body[key], (path, body)


def test_wrong_method_is_json_405(server: ServerProcess) -> None:
    response = httpx.delete(f"{server.url}/health", timeout=30)
    assert response.status_code == 405
    assert json_of(response)
    response = httpx.put(f"{server.url}/api/v1/orgs", json={}, timeout=30)
    assert response.status_code == 405
    assert json_of(response)["detail"]
