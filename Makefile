# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when it is missing and installs the project into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ssv2prep-installed
DEMO_OUT ?= demo-out
# Test processes (pytest-xdist): one per core by default; TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= logical
# The GPU check. `make gpu-bundle` (here, with the registry) collects the wheels a GPU machine without network lacks;
# `make gpu-check` (there) installs them beside that machine's own torch and runs `ssv2prep bench train`.
GPU_BUNDLE ?= gpu-bundle
GPU_PYTHON ?= python3
GPU_PLATFORM ?= manylinux_2_28_x86_64
GPU_CHECK_ARGS ?= --device cuda --json gpu-check.json
# What `bench train` imports at run time beyond torch, torchvision, numpy, pillow, click, rich, requests, matplotlib
# (the GPU machine's own); the versions are the ones tested in .venv.
GPU_WHEELS := av braceexpand

.PHONY: demo test test-fast lint install clean gpu-bundle gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(PY) -m ssv2prep demo --out $(DEMO_OUT)

# av ships one abi3 wheel for CPython >= 3.11, so one download serves any such Python on $(GPU_PLATFORM).
gpu-bundle: $(STAMP)
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --platform $(GPU_PLATFORM) --python-version 3.11 \
		--dest $(GPU_BUNDLE) $$(for p in $(GPU_WHEELS); do \
		printf '%s==%s ' $$p "$$($(PY) -c "import importlib.metadata as m; print(m.version('$$p'))")"; done)
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation --no-index --wheel-dir $(GPU_BUNDLE) .
	@ls -l $(GPU_BUNDLE)/*.whl
	@$(PY) -c "import pathlib, sys; n = sum(p.stat().st_size for p in pathlib.Path('$(GPU_BUNDLE)').glob('*.whl')); \
		print(f'$(GPU_BUNDLE): {n / 2**20:.1f} MiB'); sys.exit(n >= 60 * 2**20)"

# Installs into $(GPU_BUNDLE)/site (not the machine's site-packages, --no-deps): its torch stays as it is.
gpu-check:
	@test -d $(GPU_BUNDLE) || { echo "no $(GPU_BUNDLE)/: run 'make gpu-bundle' where the registry is reachable"; exit 2; }
	rm -rf $(GPU_BUNDLE)/site
	$(GPU_PYTHON) -m pip install --quiet --no-index --no-deps --target $(GPU_BUNDLE)/site $(GPU_BUNDLE)/*.whl
	PYTHONPATH=$(CURDIR)/$(GPU_BUNDLE)/site $(GPU_PYTHON) -m ssv2prep bench train $(GPU_CHECK_ARGS)

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
