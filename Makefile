# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if missing, install, train + generate on the built-in tiny pipeline
#   make test   - create .venv if missing, install, run the test suite
# TORCH is what pip installs first. The default is the CPU build that lies on this project's
# machines; on a GPU machine install your CUDA build of torch into .venv first and run
# `make demo TORCH=` (empty) so nothing replaces it.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test test-fast bench clean chromium lint docs paddle-venv fuzz

# What the demo runs: torch and textinv with its own dependencies, nothing else.
$(BIN)/textinv: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	test -z "$(TORCH)" || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The tests' and the linters' tools on top (pytest, playwright, ruff, mypy, gradio, the optimizers' libraries).
TEST_TOOLS := $(VENV)/.textinv-test-tools
$(TEST_TOOLS): $(BIN)/textinv
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/textinv
	$(BIN)/textinv demo --output_dir demo-output

test: $(TEST_TOOLS) $(CHROMIUM)
	$(BIN)/python -m pytest -q

# The quick loop while editing (under 2 minutes on 2 CPUs): leaves out the tests marked slow,
# browser, multiprocess and interop (see [tool.pytest.ini_options] markers); `make test` runs them all.
# One torch thread unless OMP_NUM_THREADS says otherwise: the tiny models gain nothing from more, and
# on a shared 2-CPU machine two threads per process spin against other jobs (3x slower when loaded).
test-fast: $(TEST_TOOLS)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest -q -m "not slow and not browser and not multiprocess and not interop"

# The web page's browser test drives Debian's chromium (Playwright never downloads a browser here).
# apt-get as root, else through sudo when there is one; otherwise say what to install.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	else echo "$(CHROMIUM) is missing: install Debian's chromium package (apt-get install chromium) as root" >&2; exit 1; fi; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium

chromium: $(CHROMIUM)

# ruff (lint + format check) on everything, mypy on src/: the habits CI keeps.
lint: $(TEST_TOOLS)
	$(BIN)/ruff check src tests bench train_textual_inversion.py docs/cli_reference.py
	$(BIN)/ruff format --check src tests bench train_textual_inversion.py docs/cli_reference.py
	$(BIN)/mypy

# The documentation site (mkdocs.yml, docs/): regenerate the command-line reference docs/cli.md from the parsers,
# then build with --strict (a broken link or anchor, a page missing from the nav fail) into site/. Offline: no plugin
# reaches the network. DOCS_CHECK=1 (CI) fails on a docs/cli.md that differs from the parsers instead of rewriting it.
docs: $(TEST_TOOLS)
	$(BIN)/python docs/cli_reference.py $(if $(DOCS_CHECK),--check)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

# PaddlePaddle + ppdiffusers for tests/test_ppdiffusers.py (the seed's snippets in real ppdiffusers), in a venv
# of its own (its huggingface_hub pin conflicts with ours). Built once from the pins into a cache folder outside
# the repo, named by the pins' hash, and reused while it is complete (.textinv-complete is written last).
# The test finds it there, or at $TEXTINV_PADDLE_PYTHON.
PADDLE_PINS := tests/paddle-requirements.txt tests/paddle-constraints.txt
PADDLE_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/textinv
PADDLE_VENV = $(PADDLE_CACHE)/paddle-venv-$(shell cat $(PADDLE_PINS) | sha256sum | cut -c1-12)

paddle-venv:
	@if [ -f "$(PADDLE_VENV)/.textinv-complete" ]; then echo "paddle venv: $(PADDLE_VENV)"; else \
	  rm -rf "$(PADDLE_VENV)" && $(PYTHON) -m venv "$(PADDLE_VENV)" && \
	  "$(PADDLE_VENV)/bin/python" -m pip install --quiet --upgrade pip && \
	  "$(PADDLE_VENV)/bin/python" -m pip install --quiet -r tests/paddle-requirements.txt -c tests/paddle-constraints.txt && \
	  HF_HUB_OFFLINE=1 AISTUDIO_BOS_OFFLINE=1 "$(PADDLE_VENV)/bin/python" -c "import paddle, ppdiffusers" && \
	  touch "$(PADDLE_VENV)/.textinv-complete" && echo "paddle venv: $(PADDLE_VENV) (built)"; fi

# Speed/memory and learning benchmarks (minutes; the first run builds a ~4 GB SD1.5-shaped
# pipeline with random weights in ~/.cache/textinv-bench). They print tables; nothing is asserted.
bench: $(BIN)/textinv
	$(BIN)/python bench/train_step.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/learning.py

# The fuzz suite (issue 31) for a set time with random seeds: every reader of untrusted input under the property of
# tests/fuzz_harness.py. The corpus (hypothesis' database of failing cases, findings/) stays outside the repository;
# `make test` runs the seeded CI set (tests/test_fuzz.py) instead. Prints executions and findings; exit 1 on a finding.
FUZZ_SECONDS ?= 600
FUZZ_CORPUS ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/textinv/fuzz-corpus
fuzz: $(TEST_TOOLS)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python bench/fuzz.py --seconds $(FUZZ_SECONDS) --corpus "$(FUZZ_CORPUS)"

clean:
	rm -rf demo-output .pytest_cache site
