# Every install step lives here: CI runs `make test` on a clean clone.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean chromium

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# Without CUDA, take the CPU wheel first so no dependency pulls a multi-GB CUDA build.
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install --quiet torch==2.13.0; fi
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/sdlora demo

# The web UI test drives Debian's Chromium through Playwright (never `playwright install`).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: setup chromium
	$(VENV)/bin/ruff check sdlora webui tests benchmarks
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check sdlora webui tests benchmarks

clean:
	rm -rf $(VENV) outputs .pytest_cache
