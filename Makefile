# `make test` / `make demo` set everything up on a fresh Debian/Ubuntu machine and are idempotent:
# the virtual environment is (re)installed only when a requirements file changes.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?= -q

.PHONY: setup test test-all demo ffmpeg buildtools bench clean

setup: ffmpeg buildtools $(STAMP)

# torchcodec needs FFmpeg's shared libraries: install them when missing and we are root.
ffmpeg:
	@if ! ldconfig -p 2>/dev/null | grep -q libavcodec; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing FFmpeg (apt-get)..."; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; \
	  else \
	    echo "FFmpeg shared libraries are missing: install them (e.g. 'sudo apt-get install ffmpeg') and rerun."; exit 1; \
	  fi; \
	fi

# pesq (test requirement: the PESQ quality metric) is published as source only; building it needs
# a C compiler and Python's headers: install them when missing and we are root.
buildtools:
	@if ! command -v cc >/dev/null 2>&1 || ! python3 -c "import os, sys, sysconfig; \
	    sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))"; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "Installing a C compiler and Python headers (apt-get) to build pesq..."; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential python3-dev >/dev/null; \
	  else \
	    echo "pesq builds from source: install a C compiler and Python headers (e.g. 'sudo apt-get install build-essential python3-dev') and rerun."; exit 1; \
	  fi; \
	fi

$(STAMP): requirements_training.txt requirements_test.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements_training.txt -r requirements_test.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# `make test`: everything not marked slow, in TEST_WORKERS pytest-xdist processes (each test runs
# single-threaded, so two workers use both cores of a 2-core machine: about twice as fast as one
# process; README "Tests" has the measurements); `make test-all`: the whole suite in one process
# (CI: the slow tests launch torchrun, kill processes and time collectives, and are kept away
# from each other).
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m training.demo

bench: setup
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_inference.py
	$(PY) benchmarks/bench_tokenize.py

clean:
	rm -rf $(VENV) .pytest_cache demo_run
