import json
import os

import pytest
import uvicorn
from fastapi.testclient import TestClient

from resmemnet.cli import main
from resmemnet.serve.app import ENV_CONFIG, app_from_env
from tests.serve.conftest import photo_bytes


@pytest.fixture
def uvicorn_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append((app, kw)))
    return calls


def test_serve_builds_the_app_with_the_flags(uvicorn_calls, tiny_checkpoint):
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--port", "8123", "--max-files", "3",
                 "--max-file-mb", "0.5"]) == 0
    (app, kwargs), = uvicorn_calls
    assert kwargs == {"host": "127.0.0.1", "port": 8123}
    with TestClient(app) as client:
        limits = client.get("/v1/model").json()["limits"]
        assert limits["max_files"] == 3 and limits["max_file_bytes"] == 2**19
        r = client.post("/v1/predict", files=[("files", ("a.jpg", photo_bytes(0)))])
        assert r.status_code == 200 and 0 <= r.json()["results"][0]["score"] <= 1


def test_several_workers_load_the_app_by_name(uvicorn_calls, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv(ENV_CONFIG, "{}")  # restored after the test, whatever main() sets
    assert main(["serve", "--checkpoint", str(tiny_checkpoint), "--workers", "2", "--max-batch", "4"]) == 0
    (app, kwargs), = uvicorn_calls
    assert app == "resmemnet.serve.app:app_from_env" and kwargs["factory"] is True and kwargs["workers"] == 2
    config = json.loads(os.environ[ENV_CONFIG])
    assert config["checkpoint"] == str(tiny_checkpoint) and config["settings"]["max_batch"] == 4
    assert app_from_env().state.settings.max_batch == 4  # what each worker process does


def test_bad_arguments_are_one_line_errors(uvicorn_calls, tmp_path, capsys):
    assert main(["serve", "--checkpoint", str(tmp_path / "missing.safetensors")]) == 2
    assert "No checkpoint file at" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", "x", "--max-files", "0"]) == 2
    assert "max_files must be at least 1" in capsys.readouterr().err
    assert uvicorn_calls == []
