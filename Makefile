# The two commands of the README: `make demo` and `make test`.
# Both create the virtual environment at .venv on first use (nothing to install by hand).
# `make demo` installs only the package (what the demo uses); `make test` adds the `dev`
# extra (test tools, ONNX, TensorFlow for the converter tests). Each has its own stamp, so
# either works first, and the other one then installs only what is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-base
DEV_STAMP := $(VENV)/.installed-dev
FMNIST := /usr/share/datasets/fashion-mnist
# Benchmarks and long runs: keep glibc from unmapping large intermediates (see docs/sparse.md).
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 4294967296
export HF_HUB_OFFLINE := 1

.PHONY: setup demo test bench data clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The tested pins (the package itself only declares ranges).
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

# Rebuilt whenever the base is (a changed pyproject.toml reinstalls both).
$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

setup: $(STAMP) data

# Real Fashion-MNIST from Debian (the demo's and the tests' data source).
data:
	@test -f $(FMNIST)/train-images-idx3-ubyte.gz || \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
	  (echo "could not install dataset-fashion-mnist; pass --data-dir to sact" >&2; exit 1)

# --overwrite: a second `make demo` replaces the previous demo's own files in reports/demo (nothing else).
demo: setup
	$(BIN)/sact demo --out reports/demo --overwrite

test: $(DEV_STAMP) data
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q tests

# The sparse engine's speed benchmark (docs/sparse.md); results in ./sact_bench/ unless
# BENCH_ARGS says otherwise, e.g. make bench BENCH_ARGS="--quick" or "--out DIR --tag NAME".
BENCH_ARGS ?=
bench: setup
	$(BIN)/sact bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
