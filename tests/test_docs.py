"""The documentation cannot drift: docs/cli.md is what the parsers say, the site builds with --strict, and the
README stays a newcomer's page that links every page of the site (docs/ARCHITECTURE.md, "The documentation site")."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"


def _cli_reference():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav (`Title: page.md` lines)."""
    text = (REPO / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:") :]
    return re.findall(r":\s+([\w.-]+\.md)\s*$", nav, flags=re.MULTILINE)


def test_the_committed_cli_reference_is_what_the_parsers_say() -> None:
    committed = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert committed == _cli_reference().render(), "docs/cli.md is out of date: run `make docs` and commit docs/cli.md"


def test_the_cli_reference_has_every_flag_of_every_command_with_its_help() -> None:
    from textinv.cli import build_parser

    page = (DOCS / "cli.md").read_text(encoding="utf-8")
    parser = build_parser()
    commands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices
    for name, command in commands.items():
        section = page[page.index(f"## `textinv {name}`") :]
        section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}" in section or f", {flag}" in section, (name, flag)
    train = page[page.index("## `textinv train`") :]
    assert "| `--learning_rate LEARNING_RATE` |" in train
    assert "| `--lr_scheduler CHOICE` | `cosine` | `constant`, `constant_with_warmup`," in train
    script = page[page.index("## `python train_textual_inversion.py`") :]
    assert "| `--train_batch_size TRAIN_BATCH_SIZE` | `16` |" in script  # ppdiffusers' default, the root script's
    assert "| `--lr_scheduler CHOICE` | `constant` |" in script


def test_the_cli_reference_is_the_same_on_every_run_and_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    first = _cli_reference().render()
    monkeypatch.setenv("COLUMNS", "37")
    assert _cli_reference().render() == first


def test_a_stale_cli_reference_fails_the_check_and_names_make_docs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    module = _cli_reference()
    stale = tmp_path / "cli.md"
    stale.write_text(module.render().replace("learn a new token", "learn an old token"), encoding="utf-8")
    monkeypatch.setattr(module, "OUTPUT", stale)
    monkeypatch.setattr(module, "REPO", tmp_path)
    assert module.main(["--check"]) == 1
    assert "run `make docs`" in capsys.readouterr().err
    assert module.main([]) == 0 and stale.read_text(encoding="utf-8") == module.render()  # make docs rewrites it
    assert module.main(["--check"]) == 0


def test_the_site_builds_offline_with_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`, as `make docs` and CI run it: a broken link or anchor, or a page left out of the
    nav, fails. No network: the proxies point nowhere."""
    nowhere = "http://127.0.0.1:9"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HTTP_PROXY=nowhere, HTTPS_PROXY=nowhere, NO_PROXY="")
    env.update(http_proxy=nowhere, https_proxy=nowhere, no_proxy="")
    site = tmp_path / "site"
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml")]
        + ["--site-dir", str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert (site / "index.html").is_file() and (site / "cli" / "index.html").is_file()
    pages = {path.stem for path in DOCS.glob("*.md")}
    assert pages == {Path(page).stem for page in _nav_pages()}  # every page is in the nav, and only those


def test_the_readme_is_a_page_that_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    quick = readme[readme.index("## Quick start") :]
    commands = re.search(r"```bash\n(.*?)```", quick, flags=re.DOTALL).group(1).splitlines()
    assert [line.split()[:2] for line in commands[:2]] == [["make", "demo"], ["make", "test"]]
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)(?:#[\w-]+)?\)", readme))
    for target in linked:
        assert (REPO / target).is_file(), target
    read_on = readme[readme.index("## Read on") :]
    for page in _nav_pages():
        assert f"(docs/{page})" in read_on, page


def test_the_ci_script_builds_the_docs_after_lint_and_still_runs_make_test() -> None:
    steps = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("make ")]
    assert steps.index("make docs DOCS_CHECK=1") == steps.index("make lint") + 1
    assert steps[-1] == "make test"
