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

.PHONY: demo test bench clean chromium

$(BIN)/textinv: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	test -z "$(TORCH)" || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/textinv
	$(BIN)/textinv demo --output_dir demo-output

test: $(BIN)/textinv $(CHROMIUM)
	$(BIN)/python -m pytest -q

# The web page's browser test drives Debian's chromium (Playwright never downloads a browser here).
# apt-get as root, else through sudo when there is one; otherwise say what to install.
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; \
	else echo "$(CHROMIUM) is missing: install Debian's chromium package (apt-get install chromium) as root" >&2; exit 1; fi; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends chromium

chromium: $(CHROMIUM)

# Speed/memory and learning benchmarks (minutes; the first run builds a ~4 GB SD1.5-shaped
# pipeline with random weights in ~/.cache/textinv-bench). They print tables; nothing is asserted.
bench: $(BIN)/textinv
	$(BIN)/python bench/train_step.py
	OMP_NUM_THREADS=1 $(BIN)/python bench/learning.py

clean:
	rm -rf demo-output .pytest_cache
