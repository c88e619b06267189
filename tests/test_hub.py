"""--push_to_hub against a stand-in Hub on 127.0.0.1: the real huggingface_hub client code runs."""

from __future__ import annotations

import base64
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO, train_config
from textinv import train
from textinv.config import UserError
from textinv.observers.hub import push_folder

TOKEN = "hf_stand_in_token_123"
USER = "me"


@dataclass
class StandInHub:
    """What the stand-in received: (method, path, headers, body) per request, and the committed files."""

    endpoint: str
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    validated: list[str] = field(default_factory=list)
    refuse_token: bool = False

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _, _ in self.requests if m == method]


def _handler(hub: StandInHub) -> type[http.server.BaseHTTPRequestHandler]:
    """The few endpoints create_repo + upload_folder call (repo creation, pre-upload, commit)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path, dict(self.headers), b""))
            self._reply(404, {"error": "not in the stand-in"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hub.requests.append(("POST", self.path, dict(self.headers), body))
            if hub.refuse_token:
                self._reply(401, {"error": "Invalid credentials in Authorization header"})
            elif self.path == "/api/repos/create":
                payload = json.loads(body)
                repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
                self._reply(200, {"url": f"{hub.endpoint}/{repo_id}"})
            elif self.path == "/api/validate-yaml":  # the client checks README.md's metadata first
                hub.validated.append(json.loads(body)["content"])
                self._reply(200, {"warnings": []})
            elif "/preupload/" in self.path:
                files = json.loads(body)["files"]
                self._reply(
                    200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            elif "/commit/" in self.path:
                for line in body.decode().splitlines():
                    entry = json.loads(line)
                    if entry["key"] == "file":
                        hub.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
                repo = self.path.split("/api/models/")[1].split("/commit/")[0]
                self._reply(200, {"commitUrl": f"{hub.endpoint}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
            else:
                self._reply(404, {"error": "not in the stand-in"})

    return Handler


@pytest.fixture
def stand_in_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandInHub]:
    import huggingface_hub.constants

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    hub = StandInHub(endpoint=f"http://127.0.0.1:{server.server_port}")
    server.RequestHandlerClass = _handler(hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # conftest turns it on for loading
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_push_uploads_the_output_dir_after_training(
    stand_in_hub: StandInHub, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "cat-toy"
    config = train_config(
        tiny_model,
        train_images,
        output_dir,
        max_train_steps=4,
        checkpointing_steps=2,
        only_save_embeds=True,
        report_to="none",
        push_to_hub=True,
        hub_token=TOKEN,
        hub_model_id="cat-toy",
    )
    train(config, show_progress=False)

    create = [body for method, path, _, body in stand_in_hub.requests if path == "/api/repos/create"]
    assert len(create) == 1 and json.loads(create[0])["name"] == "cat-toy"
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for _, _, headers, _ in stand_in_hub.requests)
    assert any(path.startswith(f"/api/models/{USER}/cat-toy/commit/") for path in stand_in_hub.paths("POST"))

    uploaded = stand_in_hub.files
    local = _snapshot(output_dir)
    assert uploaded["learned_embeds.safetensors"] == local["learned_embeds.safetensors"]
    assert uploaded["README.md"] == local["README.md"]
    assert stand_in_hub.validated == [local["README.md"].decode()]
    # The server made "cat-toy" into "me/cat-toy": the card tells users the full id.
    assert f'load_textual_inversion("{USER}/cat-toy")' in uploaded["README.md"].decode()
    assert "run.json" in uploaded and "learned_embeds-steps-2.safetensors" not in uploaded  # save_steps 500
    assert (output_dir / "checkpoint-2").is_dir()
    assert not [name for name in uploaded if name.startswith(("checkpoint-", "."))]  # resume state stays local
    assert all(TOKEN.encode() not in content for content in uploaded.values())  # the token is never written

    record = json.loads((output_dir / "run.json").read_text())
    assert record["hub"]["repo_id"] == f"{USER}/cat-toy"
    assert record["config"]["hub_token"] == "<redacted>"


def test_refused_token_is_one_line_and_touches_nothing(stand_in_hub: StandInHub, tmp_path: Path) -> None:
    folder = tmp_path / "result"
    folder.mkdir()
    (folder / "learned_embeds.safetensors").write_bytes(b"vectors")
    before = _snapshot(folder)
    stand_in_hub.refuse_token = True
    with pytest.raises(UserError) as error:
        push_folder(folder, "me/x", "hf_wrong")
    message = str(error.value)
    assert "\n" not in message and "refused" in message and "intact" in message
    assert _snapshot(folder) == before


def test_unreachable_endpoint_after_training_is_one_line_and_keeps_the_results(
    tiny_model: Path, train_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    output_dir = tmp_path / "out"
    config = train_config(
        tiny_model,
        train_images,
        output_dir,
        max_train_steps=2,
        checkpointing_steps=None,
        only_save_embeds=True,
        report_to="none",
        push_to_hub=True,
        hub_token=TOKEN,
    )
    with pytest.raises(UserError) as error:
        train(config, show_progress=False)
    message = str(error.value)
    assert "\n" not in message and endpoint in message and "could not push" in message and str(output_dir) in message
    record = json.loads((output_dir / "run.json").read_text())
    assert record["status"] == "completed" and "hub" not in record
    assert (output_dir / "learned_embeds.safetensors").is_file() and (output_dir / "README.md").is_file()


@pytest.mark.slow
def test_missing_token_is_one_line_before_training(tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")  # no saved token either
    command = [
        sys.executable,
        "-m",
        "textinv.cli",
        "train",
        # A model that does not exist: the token is checked before any model is loaded.
        f"--pretrained_model_name_or_path={tmp_path / 'no-such-model'}",
        f"--train_data_dir={tmp_path}",
        "--placeholder_token=<t>",
        "--initializer_token=toy",
        f"--output_dir={output_dir}",
        "--push_to_hub",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert completed.returncode == 2, completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--push_to_hub needs a Hugging Face token" in lines[0] and "--hub_token" in lines[0], (
        lines
    )
    assert _snapshot(output_dir) == {"notes.txt": b"mine"}
