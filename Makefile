# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# The tested torch build. A user with CUDA can override it, e.g.
#   make demo TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps demo lint test test-slow test-all clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medseg demo configs/demo.yaml --out runs/demo

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests

# Debian packages the archive tests use: a real Orthanc with its DICOMweb plugin, and
# dciodvfy (dicom3tools) to validate every DICOM SEG/RTSTRUCT the tests write. Installed where
# apt-get is available and we are root (as on CI); elsewhere those tests skip with the reason.
SYSTEM_PACKAGES := orthanc orthanc-dicomweb dicom3tools

system-deps:
	@if command -v Orthanc >/dev/null && command -v dciodvfy >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	else echo "system-deps: not root with apt-get; the Orthanc/dciodvfy tests will skip (install: $(SYSTEM_PACKAGES))"; fi

# `make test`: lint, then every test not marked slow (a few minutes). `make test-slow`: the slow end-to-end
# checks (real torchrun ranks, the real Orthanc, trained exports...). CI (.ci/run) runs both.
test: lint system-deps
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m slow

test-all: test test-slow

clean:
	rm -rf runs data/demo data/demo-mr .pytest_cache
