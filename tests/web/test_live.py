"""Abuse over real sockets (uvicorn in a thread): clients that disconnect mid-request or mid-job, half-sent
bodies; the server answers everyone else and every job still finishes. Plus the CLI's argument errors."""

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from rectiflow.cli.main import main
from rectiflow.sample.model_ids import parse_model_spec
from rectiflow.web.server import is_loopback

PROMPT = "a photo of a red circle"


@pytest.fixture
def live(make_app):
    app, manager = make_app()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    yield port, manager
    server.should_exit = True
    thread.join(10)


def _request(port, method, path, body=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def _raw(port, data: bytes, read: int = 0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        return s.recv(read) if read else b""


def test_disconnecting_clients_do_not_disturb_the_server(live):
    port, manager = live
    body = json.dumps({"prompt": PROMPT, "steps": 50}).encode()
    post = (b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    # 1. a client that sends a whole request and leaves without reading the answer
    _raw(port, post + body)
    # 2. a client that promises a body and leaves half-way
    _raw(port, post + body[:10])
    # 3. a client that follows a job's events and leaves mid-job
    status, created = _request(port, "POST", "/v1/generate", {"prompt": PROMPT, "steps": 100})
    assert status == 202
    events = _raw(port, f"GET /v1/jobs/{created['id']}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode(), 200)
    assert b"200 OK" in events
    # 4. a long poll abandoned before its answer
    _raw(port, f"GET /v1/jobs/{created['id']}?wait=20 HTTP/1.1\r\nHost: x\r\n\r\n".encode())

    status, job = _request(port, "GET", f"/v1/jobs/{created['id']}?wait=30")
    assert status == 200 and job["status"] == "done"
    status, fresh = _request(port, "POST", "/v1/generate", {"prompt": PROMPT})
    assert status == 202
    status, job = _request(port, "GET", f"/v1/jobs/{fresh['id']}?wait=30")
    assert job["status"] == "done"
    deadline = time.monotonic() + 30
    while manager.stats()["queued"] + manager.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = manager.stats()
    assert stats["queued"] == stats["running"] == 0
    # the first client's job ran too (its request was complete); the half-sent one made no job
    assert stats["completed_images"] == 3
    assert not manager._waiters  # abandoned event streams and long polls left nothing behind


@pytest.mark.parametrize("argv, message", [
    (["serve", "--queue", "0"], "--queue must be >= 1"),
    (["serve", "--port", "70000"], "--port must be 0..65535"),
    (["serve", "--store-mb", "0"], "--store-mb must be > 0"),
    (["serve", "--max-steps", "0"], "max_steps must be a positive integer"),
    (["serve", "--model", "../up=somewhere"], "model id '../up' is not allowed"),
    (["serve", "--model", "a=x", "--model", "a=y"], "is given twice"),
])
def test_serve_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_model_specs_and_loopback():
    assert parse_model_spec("default") == ("default", None)
    assert parse_model_spec("schnell=/models/FLUX.1-schnell") == ("schnell", "/models/FLUX.1-schnell")
    assert parse_model_spec("/models/FLUX.1 schnell") == ("FLUX.1-schnell", "/models/FLUX.1 schnell")
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
