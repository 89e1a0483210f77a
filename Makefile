# edgefm: two commands on a fresh machine.
#   make book   # installs what it needs, then builds the book into _build/html (profile: default)
#   make test   # installs what it needs, runs pytest, then builds the whole book in the smoke profile
# PROFILE=smoke|default|full picks the scale of `make book` (see README).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= default
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

# Each profile builds into its own folder, so each has its own jupyter cache.
BUILD_ROOT = $(if $(filter default,$(1)),.,_build/$(1))
# jupyter-cache hashes only a notebook's code cells: key the cache on the library's source too.
LIBRARY_HASH = $(shell find src/edgefm -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)

.PHONY: setup system-deps book book-smoke test lint clean

setup: $(VENV)/.installed system-deps

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# The offline dataset's raw files come from Debian; elsewhere the library's error says what to do.
system-deps:
	@if [ -n "$$EDGEFM_FASHION_MNIST" ] || [ -d $(FASHION_MNIST_DIR) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "note: no apt-get; set EDGEFM_FASHION_MNIST to a folder with the Fashion-MNIST files" \
		     "or EDGEFM_DOWNLOAD=1 to download them"; \
	fi

# $(1): profile, $(2): extra jupyter-book flags
define build_book
	@cache=$(call BUILD_ROOT,$(1))/_build/.jupyter_cache; \
	if [ -d $$cache ] && [ "$$(cat $$cache/edgefm-library.hash 2>/dev/null)" != "$(LIBRARY_HASH)" ]; then \
		echo "edgefm library changed: clearing $$cache"; rm -rf $$cache; \
	fi; mkdir -p $$cache && echo "$(LIBRARY_HASH)" > $$cache/edgefm-library.hash
	EDGEFM_PROFILE=$(1) $(BIN)/jupyter-book build . --path-output $(call BUILD_ROOT,$(1)) $(2)
endef

book: setup
	$(call build_book,$(PROFILE),)

book-smoke: setup
	$(call build_book,smoke,-W --keep-going)

test: setup
	$(BIN)/jupyter-book --version | grep -Eq 'Jupyter Book +: +1\.' \
		|| { echo "jupyter-book must be 1.x"; exit 1; }
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest
	$(MAKE) book-smoke

lint: setup
	$(BIN)/ruff check src tests

clean:
	rm -rf _build artifacts
