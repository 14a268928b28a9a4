"""The web monitor beside the embedded pipeline (``p3s run --web``): an operator's cancel of a running job
reaches the pilot through the in-process broker, as ``p3s cancel`` does on RabbitMQ."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.testclient import TestClient

from p3s.web.app import create_app
from tests.stack import Stack, graphml, make_settings, wait_for


def test_a_cancel_from_the_web_beside_the_embedded_pipeline_stops_the_payload(tmp_path: Path) -> None:
    watch = tmp_path / "incoming"
    watch.mkdir()
    (tmp_path / "passwords").write_text("alice:pw\n")
    settings = make_settings(tmp_path, P3S_WEB_PASSWORD_FILE=str(tmp_path / "passwords"))
    stack = Stack(settings, watch=watch, pilots=1)
    stack.import_template(graphml({"a": {"command": "sleep 120"}}, trigger="*.dat"))
    stack.start()
    client = TestClient(create_app(settings, engine=stack.engine, broker_counts=False, beside_pipeline=True))
    try:
        (watch / "run1.dat").write_bytes(b"x")
        job = wait_for(lambda: next((j for j in stack.jobs() if j["state"] == "running"), None), timeout=30,
                       what="the job to run")
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)  # type: ignore
        assert client.post("/login", data={"username": "alice", "password": "pw", "csrf_token": token},
                           follow_redirects=False).status_code == 303
        token = re.search(r'name="csrf_token" value="([^"]+)"',
                          client.get(f"/jobs/{job['id']}").text).group(1)  # type: ignore[union-attr]
        answer = client.post(f"/jobs/{job['id']}/cancel", data={"csrf_token": token}, follow_redirects=False)
        assert answer.status_code == 303, answer.text
        assert "told" in client.get(answer.headers["location"]).text
        # The pilot was told: its payload ends long before its 120 s, its job is recorded as ended by the
        # operator, and the pilot takes work again.
        (cancelled,) = wait_for(lambda: [j for j in stack.jobs() if j["state"] != "running"], timeout=30,
                                what="the cancelled job to end")
        assert "cancel" in cancelled["reason"], cancelled
        wait_for(lambda: stack.pilots()[0]["state"] == "idle" and stack.pilots()[0]["job_id"] is None,
                 timeout=30, what="the pilot to end the payload and be idle")
        (watch / "run2.dat").write_bytes(b"x")
        second = wait_for(lambda: next((j for j in stack.jobs() if j["state"] == "running"), None), timeout=30,
                          what="the next file's job to run")
        assert second["file"].endswith("run2.dat")
        assert client.post(f"/jobs/{second['id']}/cancel", data={"csrf_token": token},
                           follow_redirects=False).status_code == 303
        wait_for(lambda: all(j["state"] != "running" for j in stack.jobs()), timeout=30,
                 what="the second job to end")
    finally:
        client.close()
        stack.stop()
