"""``textinv serve`` end to end in a real browser: Debian's chromium driven by Playwright.

The server runs as the command a person types (``textinv serve``, in a subprocess on a free
port); the test uploads the demo images, trains 20 steps on the tiny pipeline with validation
images, watches the loss and the grid grow, downloads the embedding and generates an image.
Screenshots of each stage go to the test's tmp folder (printed at the end; ``pytest -s`` shows it).

Playwright never downloads a browser here: the test uses /usr/bin/chromium, which `make test`
installs from Debian when missing. Without it the test fails (it does not skip).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from conftest import REPO
from textinv.embeddings import read_embeddings
from textinv.tiny import demo_images_dir

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # chromium through Playwright, a real server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 120_000

# `textinv serve` with one change: after the first validation round (step 5) the training thread waits until the
# file argv[1] exists. The test opens that gate once the page showed the round's grid, so it sees a grid smaller than
# the final one however fast or slow the machine trains (no polling that must catch it in passing).
SERVE_WITH_GATE = """
import sys, time
from pathlib import Path
from textinv import cli
from textinv.observers import validation
gate, real_round = Path(sys.argv[1]), validation.Validation.run_round
def run_round(self, run, step):
    written = real_round(self, run, step)
    deadline = time.monotonic() + 300
    while step == 5 and not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return written
validation.Validation.run_round = run_round
sys.exit(cli.main(sys.argv[2:]))
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    url: str
    work: Path
    log: Path
    gate: Path  # training goes on past its first validation round once this file exists
    returncode: Optional[int] = None  # set once it has stopped


@contextlib.contextmanager
def running_server(tmp_path: Path) -> Iterator[Server]:
    """``textinv serve`` on a free loopback port; stops it with SIGTERM and records how it exited.

    (SIGTERM, not SIGINT: a background job of a non-interactive shell starts with SIGINT ignored.)
    """
    port = free_port()
    work = tmp_path / "work"
    log_path = tmp_path / "server.log"
    gate = tmp_path / "go-on-after-round-1"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVE_WITH_GATE, str(gate), "serve", "--port", str(port), "--work_dir", str(work)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env,
        )
    url = f"http://127.0.0.1:{port}/"
    server = Server(url, work, log_path, gate)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"textinv serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"textinv serve did not answer on {url} within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        server.returncode = process.returncode
        print(f"server log: {log_path}")


def text_field(page: Any, elem_id: str) -> Any:
    """The input of a Gradio Textbox/Number by its elem_id (Gradio renders a textarea or an input)."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input:not([type=file])").first


def grid_height(page: Any) -> int:
    """The natural height of the validation grid image on the page (0 while there is none)."""
    return int(
        page.evaluate(
            "() => { const img = document.querySelector('#validation-grid img'); "
            "return img && img.complete ? img.naturalHeight : 0; }"
        )
    )


def test_train_watch_download_generate_in_a_browser(tmp_path: Path) -> None:
    # Checked first: a missing browser fails the test (the project's set-up installs it); it never skips.
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: this test drives Debian's chromium; install it with "
            "`make chromium` (apt-get install chromium). Playwright must not download a browser"
        )
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)  # assertions wait as long as actions (CPU training is slow on busy machines)

    shots = tmp_path / "screenshots"
    shots.mkdir()
    images = sorted(str(p) for p in demo_images_dir().glob("*.jpg"))
    caption_file = tmp_path / "00.txt"  # uploaded with the images: 00.jpg's caption
    caption_file.write_text("a red cartoon, smiling\n", encoding="utf-8")

    with running_server(tmp_path) as server, sync_playwright() as playwright:
        url, work = server.url, server.work
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1800}, accept_downloads=True)
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.get_by_role("heading", name="textinv")).to_be_visible()

            # A mistake shows as one line in the page (here: Stop with nothing running).
            page.locator("#stop").click()
            expect(text_field(page, "train-message")).to_have_value("error: no training is running")

            # --- the form ---------------------------------------------------------------------------
            page.locator("#train-images input[type=file]").set_input_files([*images, str(caption_file)])
            # One row per uploaded file once Gradio has them (its cells split the name, so match rows).
            for image in images:
                expect(
                    page.locator("#train-images").get_by_role("row", name=re.compile(re.escape(Path(image).name)))
                ).to_be_visible()
            text_field(page, "placeholder-token").fill("<red-cartoon>")
            text_field(page, "initializer-token").fill("cartoon")
            text_field(page, "steps").fill("20")
            text_field(page, "captions").fill("01.jpg: {} waving")
            page.get_by_text("Validation images and seed").click()
            text_field(page, "validation-steps").fill("5")
            expect(text_field(page, "validation-prompt")).to_have_value("a photo of {token}")
            page.screenshot(path=str(shots / "1-form.png"), full_page=True)

            # --- training: step, loss, ETA, the grid growing ------------------------------------------
            page.locator("#start").click()
            expect(text_field(page, "train-message")).to_have_value(
                re.compile(r"started job-001: 4 image\(s\) \(2 with a caption\), 20 steps")
            )
            stored = sorted(p.name for p in work.glob("jobs/job-001-*/images/*.txt"))
            assert stored == ["00-00.txt", "01-01.txt"], stored
            progress = text_field(page, "train-progress")
            # Training waits after its first validation round (step 5): the page shows that round's grid while the
            # progress line says running, at step 4 (the page's observer hears of step 5 after the validation round).
            expect(progress).to_have_value(
                re.compile(r"running · step 4/20 · loss \d+\.\d{4} · .* ETA \d+:\d\d:\d\d"), timeout=TIMEOUT_MS
            )
            page.wait_for_function(
                "() => { const img = document.querySelector('#validation-grid img'); "
                "return img && img.complete && img.naturalHeight > 0; }"
            )
            first_height = grid_height(page)
            page.screenshot(path=str(shots / "2-training.png"), full_page=True)
            server.gate.touch()
            expect(progress).to_have_value(re.compile(r"done|failed"), timeout=TIMEOUT_MS)
            line = progress.input_value()
            # eval_loss: the page trains with `textinv train`'s held-out evaluation (docs/quality.md "How many steps")
            assert re.search(
                r"job-001: done · step 20/20 · loss \d+\.\d{4} · eval_loss \d+\.\d{4} · <red-cartoon> learned", line
            ), line
            expect(page.locator("#loss-plot canvas, #loss-plot svg").first).to_be_visible()
            expect(page.locator("#validation-grid img")).to_be_visible()
            # The page shows the grid the run drew (4 rounds: steps 5, 10, 15, 20), and it grew while training.
            from PIL import Image

            (grid_file,) = work.glob("jobs/job-001-*/output/validation/progress.png")
            with Image.open(grid_file) as grid:
                final_height = grid.height
            page.wait_for_function(
                "h => { const img = document.querySelector('#validation-grid img'); "
                "return img && img.complete && img.naturalHeight === h; }",
                arg=final_height,
            )
            assert first_height < final_height, (first_height, final_height)
            page.screenshot(path=str(shots / "3-trained.png"), full_page=True)

            # --- download -----------------------------------------------------------------------------
            page.locator("#export").click()
            expect(text_field(page, "export-message")).to_have_value(re.compile(r"wrote red-cartoon\.safetensors"))
            link = page.locator("#download a").first
            expect(link).to_be_visible()
            with page.expect_download() as download_info:
                link.click()
            downloaded = tmp_path / "downloads" / download_info.value.suggested_filename
            download_info.value.save_as(downloaded)
            (embedding,) = read_embeddings(downloaded)
            assert embedding.token == "<red-cartoon>" and embedding.step == 20
            page.screenshot(path=str(shots / "4-download.png"), full_page=True)

            # --- generate -----------------------------------------------------------------------------
            text_field(page, "prompt").fill("a {token} on the beach")
            text_field(page, "sampling-steps").fill("5")
            text_field(page, "num-images").fill("1")
            page.locator("#generate").click()
            expect(text_field(page, "generate-message")).to_have_value(
                re.compile(r"1 image\(s\) of 'a <red-cartoon> on the beach' with <red-cartoon>")
            )
            expect(page.locator("#gallery img").first).to_be_visible()
            page.screenshot(path=str(shots / "5-generated.png"), full_page=True)
        finally:
            browser.close()
    # SIGTERM ends the server cleanly (as Ctrl-C), and nothing on the way printed a traceback.
    log = server.log.read_text()
    assert server.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    print(f"screenshots: {shots}")
