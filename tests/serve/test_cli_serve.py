import json
import os

import pytest
import uvicorn
from fastapi.testclient import TestClient

from resmemnet.cli import main
from resmemnet.data.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV
from resmemnet.serve.app import ENV_CONFIG, app_from_env
from resmemnet.serve.protocol import HeaderTimeoutH11Protocol
from tests.serve.conftest import photo_bytes


@pytest.fixture
def uvicorn_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_serve_builds_the_app_with_the_flags(uvicorn_calls, tiny_checkpoint):
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--port", "8123", "--max-files", "3",
                 "--max-file-mb", "0.5", "--max-pixels", "1000000", "--header-timeout", "2.5",
                 "--body-timeout", "7"]) == 0
    (app, kwargs), = uvicorn_calls
    assert {k: kwargs[k] for k in ("host", "port", "timeout_keep_alive")} == {"host": "127.0.0.1", "port": 8123,
                                                                            "timeout_keep_alive": 5}
    assert kwargs["http"].func is HeaderTimeoutH11Protocol and kwargs["http"].keywords == {"header_timeout_s": 2.5}
    with TestClient(app) as client:
        limits = client.get("/v1/model").json()["limits"]
        assert limits["max_files"] == 3 and limits["max_file_bytes"] == 2**19
        assert limits["max_pixels"] == 1_000_000 and limits["body_timeout_s"] == 7
        r = client.post("/v1/predict", files=[("files", ("a.jpg", photo_bytes(0)))])
        assert r.status_code == 200 and 0 <= r.json()["results"][0]["score"] <= 1


def test_the_precision_flag_reaches_the_one_scorer(uvicorn_calls, tiny_checkpoint):
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--precision", "fp32", "--device", "cpu"]) == 0
    (app, _), = uvicorn_calls
    assert app.state.scorer.precision.name == "fp32" and app.state.settings.precision == "fp32"
    with TestClient(app) as client:
        card = client.get("/v1/model").json()
    assert (card["precision"], card["precision_reason"], card["limits"]["precision"]) == ("fp32", "requested", "fp32")


def test_several_workers_load_the_app_by_name(uvicorn_calls, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(ENV_CONFIG, "{}")  # restored after the test, whatever main() sets
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--workers", "2", "--max-batch", "4"]) == 0
    (app, kwargs), = uvicorn_calls
    assert app == "resmemnet.serve.app:app_from_env" and kwargs["factory"] is True and kwargs["workers"] == 2
    config = json.loads(os.environ[ENV_CONFIG])
    assert config["checkpoint"] == str(tiny_checkpoint) and config["settings"]["max_batch"] == 4
    assert app_from_env().state.settings.max_batch == 4  # what each worker process does


def test_one_pixel_limit_for_the_cli_and_the_server(uvicorn_calls, tiny_checkpoint, monkeypatch):
    """Without --max-pixels the server uses the library's limit, which $RESMEMNET_MAX_PIXELS overrides."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    assert main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 0
    monkeypatch.setenv(MAX_PIXELS_ENV, "12345")
    assert main(["serve", "--checkpoint", str(tiny_checkpoint)]) == 0
    assert [app.state.settings.max_pixels for app, _ in uvicorn_calls] == [DEFAULT_MAX_PIXELS, 12345]


def test_bad_arguments_are_one_line_errors(uvicorn_calls, tmp_path, capsys, monkeypatch):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "No checkpoint file at" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--max-files", "0"]) == 2
    assert "max_files must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--body-timeout", "0"]) == 2
    assert "body_timeout_s must be positive" in capsys.readouterr().err
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    assert main(["serve", "--checkpoint", "x"]) == 2
    assert f"{MAX_PIXELS_ENV}='lots' is not a positive whole number" in capsys.readouterr().err
    assert uvicorn_calls == []


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_that_is_no_tcp_port_is_a_bad_argument(uvicorn_calls, capsys, port):
    """Issue 21.6: `serve --port 99999` was reported as `internal error: OverflowError`."""
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--port", port])
    assert exit_info.value.code == 2
    assert f"argument --port: {port!r} is not a TCP port (a whole number in 0..65535)" in capsys.readouterr().err
    assert uvicorn_calls == []
