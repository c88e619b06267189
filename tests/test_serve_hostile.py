"""``textinv serve`` as an attacker sees it (issue 31): hostile upload names, symlinks, thousands of files, a 2 GB
upload, concurrent training requests, requests from another origin or for another host name, and a public bind.
Nothing is written or read outside the work folder. The unit tests take ~1 s; the live server test ~40 s (slow)."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from fuzz_harness import guarded
from textinv.cli import main
from textinv.config import UserError
from textinv.serve.captions import caption_files
from textinv.serve.guard import host_name, same_origin
from textinv.serve.jobs import TrainRequest
from textinv.serve.server import DEFAULT_HOST, ServeOptions
from textinv.serve.state import ServerState
from textinv.serve.uploads import UploadLimits, inside_folder, store_embedding_file, store_images

HOSTILE_NAMES = [
    "../../../../tmp/pwned.png",
    "/etc/passwd",
    "..\\..\\Windows\\win.ini",
    "C:\\Users\\me\\..\\..\\x.png",
    "a/../../b.png",
    "\x00.png",
    "..",
    "",
    "\udcff\udcfe.png",  # a name that was not UTF-8 (Python's surrogate escapes)
    "x" * 5000 + ".png",
    "\u202egnp.exe",
    "con.png",
]


def png(path: Path) -> Path:
    Image.new("RGB", (16, 16), "red").save(path, format="PNG")
    return path


def test_hostile_upload_names_are_stored_under_generated_names_inside_the_folder(tmp_path: Path) -> None:
    source = png(tmp_path / "upload")
    server = tmp_path / "server"
    with guarded(server):  # any write outside the server's folder fails the test
        stored = store_images(
            [(str(source), name) for name in HOSTILE_NAMES], server / "images", UploadLimits(max_images=20)
        )
    names = [entry.path.name for entry in stored]
    assert names == [
        "00-pwned.png",
        "01-passwd.png",
        "02-win.png",
        "03-x.png",
        "04-b.png",
        "05-image.png",
        "06-image.png",
        "07-image.png",
        "08-image.png",
        "09-" + "x" * 40 + ".png",
        "10-gnp.png",
        "11-con.png",
    ]
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["upload", "server", "images", *names])


def test_a_symlink_planted_in_the_server_folder_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    words = tmp_path / "server" / "words"
    words.mkdir(parents=True)
    (words / "upload-001.pt").symlink_to(outside)  # where the next embedding upload would be written
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00" * 8)
    with pytest.raises(UserError) as caught:
        store_embedding_file(junk, "cat.pt", words, name="upload-001")
    assert str(caught.value) == "refusing the file name 'upload-001.pt'"
    assert outside.read_text() == "keep me"
    with pytest.raises(UserError, match=r"is not empty"):  # an image folder must be new or empty: no planted link
        store_images([(str(png(tmp_path / "a.png")), "a.png")], words)
    with pytest.raises(UserError, match=r"refusing the file name '../outside.txt'"):
        inside_folder(words, "../outside.txt")


def test_thousands_of_files_are_refused_before_any_is_read(tmp_path: Path) -> None:
    missing = [(str(tmp_path / f"never-read-{i}"), f"{i}.png") for i in range(5000)]  # reading any would fail
    with pytest.raises(UserError) as caught:
        store_images(missing, tmp_path / "images")
    assert str(caught.value) == "5000 images is too many; give at most 20 (3-5 is typical)"
    with pytest.raises(UserError) as caught:
        caption_files([(p, n.replace(".png", ".txt")) for p, n in missing], [n for _, n in missing], UploadLimits())
    assert str(caught.value) == "5000 caption files is too many; give at most one per image (20)"
    assert not (tmp_path / "images").exists()


def test_a_2_gb_upload_is_refused_from_its_size_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with open(big, "wb") as handle:  # sparse: 2 GiB long, no disk blocks
        handle.truncate(2 * 2**30)
    with pytest.raises(UserError) as caught:
        store_images([(str(big), "holiday.png")], tmp_path / "images")
    assert str(caught.value) == "image 'holiday.png' is 2048.0 MiB; the limit is 50 MiB"
    with pytest.raises(UserError) as caught:
        store_embedding_file(big, "word.pt", tmp_path / "words")
    assert str(caught.value) == "embedding file 'word.pt' is 2048.0 MiB; the limit is 64 MiB"
    assert not (tmp_path / "images").exists() and not (tmp_path / "words").exists()


def test_two_training_requests_at_the_same_moment_start_one_job(tmp_path: Path, tiny_model: Path) -> None:
    images = [(str(png(tmp_path / f"{i}.png")), f"{i}.png") for i in range(3)]
    state = ServerState(tmp_path / "work", default_model=tiny_model)
    request = TrainRequest(images, "<cat-toy>", "toy", max_train_steps=5000, validation_prompt="")
    barrier, started, refused = threading.Barrier(4), [], []

    def click() -> None:
        barrier.wait()
        try:
            started.append(state.start(request))
        except UserError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=click) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    try:
        assert len(started) == 1 and len(refused) == 3, (started, refused)
        assert all(message.startswith("a training job is already running (job-") for message in refused), refused
        # The refused requests left no job folder behind (one refused after storing its images removes them).
        assert [p.name.startswith(started[0].job_id) for p in (state.work_dir / "jobs").iterdir()] == [True]
        assert state.snapshot().job_id == started[0].job_id
    finally:
        state.stop()
        assert started[0].join(300)


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://127.0.0.1:7860", "127.0.0.1:7860", True),
        ("http://LOCALHOST:9000", "localhost:9000", True),
        ("http://evil.example", "127.0.0.1:7860", False),
        ("http://127.0.0.1:7861", "127.0.0.1:7860", False),  # another local server's page
        ("null", "127.0.0.1:7860", False),  # a sandboxed frame or a file:// page
        ("file://", "127.0.0.1:7860", False),
    ],
)
def test_the_origin_check(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same


def test_host_names_without_their_port() -> None:
    assert [host_name(h) for h in ("127.0.0.1:7860", "localhost", "[::1]:80", "[::1]", "evil.example:1")] == [
        "127.0.0.1",
        "localhost",
        "::1",
        "::1",
        "evil.example",
    ]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_serve_binds_loopback_by_default_and_refuses_a_public_bind_without_the_flag(
    host: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert DEFAULT_HOST == "127.0.0.1" and ServeOptions().host == "127.0.0.1" and not ServeOptions().allow_remote
    assert main(["serve", "--host", host]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (
        f"textinv: error: --host {host} is reachable from other machines, and the page can start training and read "
        "model folders here; pass --allow_remote as well if that is what you want\n"
    )


# --- the live server --------------------------------------------------------------------------------
def request(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request(method, path, body=body or None, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def multipart(name: str, data: bytes, boundary: str = "textinv-boundary") -> tuple[bytes, str]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n\r\n'.encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def claimed_2gb_upload(url: str) -> tuple[int, bytes]:
    """An upload whose Content-Length says 2 GiB; 100 MiB of it sent (the server must answer before the end)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    head, content_type = multipart("big.png", b"")
    connection.putrequest("POST", "/gradio_api/upload")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(2 * 2**30))
    connection.endheaders()
    try:
        connection.send(head[: head.index(b"\r\n\r\n") + 4])
        chunk = bytes(2**20)
        for _ in range(100):
            connection.send(chunk)
    except OSError:
        pass  # the server answered and closed early
    response = connection.getresponse()
    return response.status, response.read()


@pytest.mark.slow
def test_the_live_page_refuses_other_sites_other_host_names_and_oversize_uploads(tmp_path: Path) -> None:
    from test_serve_browser import running_server

    with running_server(tmp_path) as server:
        own = urlsplit(server.url).netloc
        status, body = request(server.url, "GET", "/", {"Host": f"evil.example:{urlsplit(server.url).port}"})
        assert (status, body) == (403, b"refused: this page answers only to 127.0.0.1 and localhost\n")
        data, content_type = multipart("cat.txt", b"hello")
        headers = {"Content-Type": content_type, "Host": own}
        status, body = request(
            server.url, "POST", "/gradio_api/upload", {**headers, "Origin": "http://evil.example"}, data
        )
        assert (status, body) == (403, b"refused: this page only answers requests from itself\n")
        assert not any(p.is_file() for p in server.work.rglob("*") if "gradio-uploads" in p.parts)
        # The page's own upload, named to climb out of the work folder: stored inside it under its last part.
        data, content_type = multipart("../../../../../" + str(tmp_path / "pwned.txt"), b"hello")
        status, body = request(
            server.url,
            "POST",
            "/gradio_api/upload",
            {**headers, "Content-Type": content_type, "Origin": f"http://{own}"},
            data,
        )
        stored = Path(json.loads(body)[0])
        assert status == 200 and stored.name == "pwned.txt" and server.work.resolve() in stored.resolve().parents
        assert stored.read_bytes() == b"hello" and not (tmp_path / "pwned.txt").exists()
        status, _ = request(server.url, "GET", "/gradio_api/file=/etc/passwd", {"Host": own})
        assert status == 403
        started = time.monotonic()
        assert claimed_2gb_upload(server.url) == (413, b"File size exceeded maximum allowed size of 67108864 bytes.")
        assert time.monotonic() - started < 30
        kept = [p.stat().st_size for p in (server.work / "gradio-uploads").rglob("*") if p.is_file()]
        assert kept == [5]  # the one small upload above; nothing of the 100 MiB sent
        assert sorted(p.name for p in tmp_path.iterdir()) == ["server.log", "work"]  # nothing written beside it
    assert server.returncode == 0
    log = server.log.read_text()
    assert "refused a request for host 'evil.example:" in log and "(Origin: http://evil.example)" in log
    assert os.path.getsize(server.log) < 100_000
