# Two entry points: `make test` and `make book`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= ci

.PHONY: install test book browser-check lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[book,test]'
	# animal-mnist's metadata requires tensorflow, which it never imports for the data files we read.
	$(BIN)/python -m pip install --quiet --no-deps 'animal-mnist==0.4'
	touch $(STAMP)

install: $(STAMP)

# The browser tests need the built site, so `make test` leaves them to browser-check.
test: $(STAMP)
	$(BIN)/python -m ruff check imba tests benchmarks
	$(BIN)/python -m pytest -q -m "not browser"

book: $(STAMP)
	rm -rf _build/html
	$(BIN)/imba reproduce --preset $(PRESET) --output executed
	$(BIN)/jupyter-book build . --warningiserror --keep-going
	test -f _build/html/index.html

# Opens every page of _build/html in headless Chromium (Debian: chromium, chromium-driver);
# fails when the site is missing. Screenshots go to _build/screenshots/.
browser-check: $(STAMP)
	IMBA_REQUIRE_SITE=1 $(BIN)/python -m pytest -q -m browser tests/test_browser.py

lint: $(STAMP)
	$(BIN)/python -m ruff check imba tests benchmarks notebooks

clean:
	rm -rf _build executed .pytest_cache
