# Two commands on a fresh machine:   make demo    |    make test
# Each one creates .venv, installs torch (CPU build), the test tools and fastunlearn with its
# native extension on first use, then runs.

PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.fastunlearn-installed
NATIVE  = $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.h csrc/cuda/*.cpp)

.PHONY: install demo test test-fast lint bench nvcc-check clean

$(STAMP): pyproject.toml setup.py $(NATIVE)
	@# The real default dataset comes from Debian (needs root); without it the demo uses sklearn digits.
	-@if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) || true; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q triton numpy scikit-learn tqdm safetensors matplotlib pillow pydicom ninja pytest pytest-xdist ruff
	FASTUNLEARN_REQUIRE_NATIVE=1 $(BIN)/pip install -q --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: install
	$(BIN)/fastunlearn demo $(ARGS)

# One pytest worker per core (pytest-xdist); ARGS="-n 0" runs in one process.
test: install
	$(BIN)/python -m pytest -q -n auto tests $(ARGS)

# Everything but the real-data quality checks.
test-fast: install
	$(BIN)/python -m pytest -q -n auto tests -m "not slow" $(ARGS)

# ruff, configured in pyproject.toml, over the whole tree.
lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/bench_boundary_step.py
	$(BIN)/python bench/bench_relabel_check.py
	$(BIN)/python bench/bench_search.py

nvcc-check:
	bash .ci/nvcc_check.sh

clean:
	rm -rf build python/fastunlearn/_C*.so *.egg-info python/*.egg-info
