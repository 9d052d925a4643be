# Two commands do all set-up on a fresh machine (see README):
#   make generate PROMPT="a photo of a yellow star and a blue square"
#   make test
# Both create .venv on first use, install the pinned CPU torch wheel and the package, then run.
PYTHON ?= python3
VENV   ?= .venv
PROMPT ?= a photo of a yellow star and a blue square
OUTPUT ?= out.png
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The page's browser test (tests/web/test_page_browser.py) drives Debian's chromium through playwright.
CHROMIUM := /usr/bin/chromium

.PHONY: setup generate test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

$(CHROMIUM):
	@[ "$$(id -u)" = 0 ] || { echo "chromium is missing: run 'apt-get install chromium' as root" >&2; exit 1; }
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

setup: $(STAMP) $(CHROMIUM)

generate: $(STAMP)
	$(BIN)/rectiflow generate "$(PROMPT)" -o "$(OUTPUT)"

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
