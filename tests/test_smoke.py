"""The server starts on each backend and answers its operations endpoints."""

from harness import Api, ServerProcess


def test_health_and_login(server: ServerProcess, root: Api) -> None:
    health = root.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "pass"
    orgs = root.get("/api/v1/orgs")
    assert orgs.status_code == 200
    assert "default" in [org["name"] for org in orgs.json()]
