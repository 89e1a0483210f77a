# edgefm: two commands on a fresh machine.
#   make book   # installs what it needs, then builds the book into _build/html (profile: default)
#   make test   # installs what it needs, runs pytest, builds the smoke book, checks it in a browser
# PROFILE=smoke|default|full picks the scale of `make book` (see README).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROFILE ?= default
FASHION_MNIST_DIR := /usr/share/datasets/fashion-mnist

# Each profile builds into its own folder, so each has its own jupyter cache. The book's extension
# book/_ext/edgefm_cache.py re-executes every chapter after a change to the library or weights/.
BUILD_ROOT = $(if $(filter default,$(1)),.,_build/$(1))

.PHONY: setup system-deps apt-get-venv apt-get-fashion-mnist apt-get-qemu-user arm64-root browser apt-get-chromium book book-smoke pdf test lint clean

setup: $(VENV)/.installed system-deps arm64-root

# A venv without pip (Debian's Python lacks ensurepip until python3.X-venv is installed) is made again.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(BIN)/pip || { rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); } \
		|| { $(MAKE) --no-print-directory apt-get-venv && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $@

# apt_install(package, what to do without it): Debian packages, where apt is there to get them.
define apt_install
	@if command -v apt-get >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		{ $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1) >/dev/null; } \
			|| echo "note: could not install $(1): $(2)"; \
	else echo "note: no apt-get to install $(1): $(2)"; fi
endef

# The offline dataset's raw files come from Debian; elsewhere the library's error says what to do.
# qemu-user emulates an AVX2-only CPU, on which INT8 models are checked (edgefm.tools.isa).
system-deps:
	@[ -n "$$EDGEFM_FASHION_MNIST" ] || [ -d $(FASHION_MNIST_DIR) ] || [ "$$EDGEFM_DOWNLOAD" = 1 ] || \
		$(MAKE) --no-print-directory apt-get-fashion-mnist
	@[ "$$(uname -m)" != x86_64 ] || command -v qemu-x86_64 >/dev/null || \
		$(MAKE) --no-print-directory apt-get-qemu-user

apt-get-qemu-user:
	$(call apt_install,qemu-user,INT8 models are not checked on an emulated CPU without VNNI)

# An emulated Raspberry Pi: Debian's arm64 Python and the aarch64 wheels of the pinned ONNX Runtime,
# NumPy and Pillow in .arm64/ (no root needed), on which the bundle is run (edgefm.tools.arm64).
# Made again when requirements.txt changes; a failed attempt keeps the old root and is not retried
# until then (the stamp records either outcome; delete .arm64.stamp to try again).
ARM64_ROOT := .arm64
arm64-root: $(ARM64_ROOT).stamp

$(ARM64_ROOT).stamp: requirements.txt | $(VENV)/.installed system-deps
	@if [ "$$(uname -m)" != x86_64 ]; then echo "note: not an x86 machine: the bundle is not checked on emulated Arm"; \
	elif ! command -v qemu-aarch64 >/dev/null || ! command -v apt-get >/dev/null; then \
		echo "note: no qemu-aarch64 or apt-get here: the bundle is not checked on Arm"; \
	elif rm -rf $(ARM64_ROOT).tmp && $(BIN)/python -m edgefm.tools.arm64 prepare $(ARM64_ROOT).tmp; then \
		rm -rf $(ARM64_ROOT) && mv $(ARM64_ROOT).tmp $(ARM64_ROOT); \
	else rm -rf $(ARM64_ROOT).tmp; echo "note: could not prepare $(ARM64_ROOT): the bundle is not checked on Arm"; fi
	@touch $@

apt-get-venv:
	$(call apt_install,$(notdir $(PYTHON))-venv,install the venv module of $(PYTHON))

apt-get-fashion-mnist:
	$(call apt_install,dataset-fashion-mnist,set EDGEFM_FASHION_MNIST to a folder with the files or EDGEFM_DOWNLOAD=1)

# Chromium for the site test and the PDF (Debian's package; Playwright downloads no browser).
browser:
	@[ -n "$$EDGEFM_CHROMIUM" ] || command -v chromium >/dev/null || $(MAKE) --no-print-directory apt-get-chromium

apt-get-chromium:
	$(call apt_install,chromium,the site test is skipped and make pdf fails)

# Your own COCO data (EDGEFM_DATA=FOLDER make book), as an absolute path: chapters run in book/.
DATA_ENV = $(if $(EDGEFM_DATA),EDGEFM_DATA=$(abspath $(EDGEFM_DATA)))

# $(1): profile, $(2): extra jupyter-book flags
define build_book
	$(DATA_ENV) EDGEFM_PROFILE=$(1) $(BIN)/jupyter-book build . --path-output $(call BUILD_ROOT,$(1)) $(2)
endef

book: setup
	$(call build_book,$(PROFILE),)

book-smoke: setup
	$(call build_book,smoke,-W --keep-going)

# The whole book as one PDF: a single-page HTML build printed by headless Chromium (works offline).
pdf: setup browser
	$(DATA_ENV) EDGEFM_PROFILE=$(PROFILE) $(BIN)/jupyter-book build . --path-output $(call BUILD_ROOT,$(PROFILE)) \
		--builder singlehtml
	mkdir -p _build/pdf
	# the single page is book/intro.html but its asset paths are relative to the build root
	cp $(call BUILD_ROOT,$(PROFILE))/_build/singlehtml/book/intro.html \
		$(call BUILD_ROOT,$(PROFILE))/_build/singlehtml/edgefm.html
	# a virtual-time budget: offline, the page's web fonts and MathJax never arrive; don't wait for them
	$${EDGEFM_CHROMIUM:-chromium} --headless --no-sandbox --disable-gpu --disable-background-networking --no-first-run \
		--disable-component-update --virtual-time-budget=20000 --run-all-compositor-stages-before-draw \
		--no-pdf-header-footer --print-to-pdf=_build/pdf/edgefm-$(PROFILE).pdf \
		file://$(abspath $(call BUILD_ROOT,$(PROFILE)))/_build/singlehtml/edgefm.html
	@echo "PDF: _build/pdf/edgefm-$(PROFILE).pdf"

# Unit tests, then the whole smoke book (warnings are errors), then the built site in a browser.
test: setup browser
	$(BIN)/jupyter-book --version | grep -Eq 'Jupyter Book +: +1\.' \
		|| { echo "jupyter-book must be 1.x"; exit 1; }
	$(BIN)/ruff check src tests book/_static book/_ext
	$(BIN)/python -m pytest -n auto --ignore=tests/site
	$(MAKE) book-smoke
	EDGEFM_SITE=_build/smoke/_build/html EDGEFM_SCREENSHOTS=_build/screenshots \
		$(BIN)/python -m pytest tests/site

lint: setup
	$(BIN)/ruff check src tests book/_static book/_ext

clean:
	rm -rf _build artifacts
