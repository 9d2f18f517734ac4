"""HTTP hygiene: security headers on every response, offline API docs, and timeouts for slow clients."""

import asyncio
import re
import socket

import httpx
import pytest
from fastapi.testclient import TestClient

import resmemnet.serve.app
from resmemnet.serve import ServeSettings, create_app
from resmemnet.serve.middleware import DOCS_PATHS
from resmemnet.serve.protocol import with_header_timeout
from tests.serve.conftest import photo_bytes, running_server


@pytest.fixture(scope="module")
def client(tiny_model):
    with TestClient(create_app(tiny_model, ServeSettings(max_files=2, max_file_bytes=4000))) as c:
        yield c


def _responses(c: TestClient) -> dict[str, httpx.Response]:
    good = [("files", ("a.jpg", photo_bytes(0, size=(40, 30))))]
    return {
        "page": c.get("/"), "docs": c.get("/docs"), "spec": c.get("/openapi.json"),
        "static": c.get("/static/app.js"), "health": c.get("/healthz"),
        "predict": c.post("/v1/predict", files=good),
        "predict 422": c.post("/v1/predict", files=[("files", ("n.jpg", b"not an image"))]),
        "not found": c.get("/v1/nothing"),
        "413": c.post("/v1/predict", files=[("files", ("big.jpg", b"0" * 40_000))]),
        "411": c.post("/v1/predict", content=iter([b"--x\r\n"]),
                      headers={"content-type": "multipart/form-data; boundary=x"}),
    }


def test_every_response_carries_the_security_headers(client):
    responses = _responses(client)
    assert {k: r.status_code for k, r in responses.items()} == {
        "page": 200, "docs": 200, "spec": 200, "static": 200, "health": 200, "predict": 200,
        "predict 422": 422, "not found": 404, "413": 413, "411": 411}
    for name, r in responses.items():
        assert r.headers["x-content-type-options"] == "nosniff", name
        assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer", name
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp, name
        # Inline script is allowed on the docs page only (Swagger UI starts from one).
        assert ("'unsafe-inline'" in csp) == (name == "docs"), name


def test_a_server_error_is_json_with_the_security_headers(tiny_model, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over")

    monkeypatch.setattr(resmemnet.serve.app, "predict", broken)
    with TestClient(create_app(tiny_model), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", files=[("files", ("a.jpg", photo_bytes(0)))])
    assert r.status_code == 500 and "Internal server error" in r.json()["detail"]
    assert r.headers["x-content-type-options"] == "nosniff" and "content-security-policy" in r.headers


def test_docs_load_nothing_from_other_hosts(client):
    for path in sorted(DOCS_PATHS):
        page = client.get(path).text
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)""", page)
        assert urls and all(u.startswith("/") for u in urls), (path, urls)
        for url in urls:
            assert client.get(url).status_code == 200, url
    assert "://" not in client.get("/docs").text.replace("http://www.w3.org", "")


def test_a_stalled_upload_gets_408_and_the_connection_closes(tiny_model):
    app = create_app(tiny_model, ServeSettings(body_timeout_s=0.2))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"1000")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
    first = [{"type": "http.request", "body": b"--x\r\nContent-Disposition: form-data; name=\"files\"; "
                                               b"filename=\"a.jpg\"\r\n\r\nabc", "more_body": True}]
    sent = []

    async def receive():
        if first:
            return first.pop()
        await asyncio.sleep(3600)  # the rest of the body never comes

    async def send(message):
        sent.append(message)

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=60))
    start = sent[0]
    headers = dict(start["headers"])
    assert start["status"] == 408 and headers[b"connection"] == b"close"
    assert headers[b"x-content-type-options"] == b"nosniff"
    assert b"did not arrive within 0.2 s" in b"".join(m.get("body", b"") for m in sent[1:])


@pytest.fixture
def live_url(tiny_model):
    """uvicorn with a 0.3 s header timeout on a free loopback port, in a background thread."""
    with running_server({"http": with_header_timeout(0.3)}, create_app(tiny_model)) as address:
        yield address


def test_a_request_head_that_never_finishes_is_closed(live_url):
    with socket.create_connection(live_url, timeout=30) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no blank line: the head never ends
        assert conn.recv(1024) == b""  # closed by the server (a timeout would raise instead)
    with socket.create_connection(live_url, timeout=30) as conn:  # a complete head is answered as usual
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert conn.recv(1024).startswith(b"HTTP/1.1 200")
