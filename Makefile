# One command each: `make run` (service on embedded defaults) and `make test` (the whole suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps run test test-unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build (a looser pin would pull a multi-GB CUDA build)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# reference implementation for tests/test_attack_reference.py; --no-deps: importing it needs
	# only numpy and scipy (a dev extra), not its declared torchvision/tqdm/requests
	$(BIN)/pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/robustact serve --host 127.0.0.1 --port 8000 --data-dir ./var

# The integration tests start their own Postgres and redis-server on loopback, and load the
# HTML report in headless Chromium: install the Debian packages when they are missing (needs
# root, as on CI and the dev machines).
sysdeps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v redis-server >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql redis-server chromium chromium-driver >/dev/null; \
	  else echo "install the Debian packages postgresql, redis-server, chromium and chromium-driver (as root) and re-run"; exit 1; fi; \
	fi

test: $(STAMP) sysdeps
	$(BIN)/pytest -q -p no:cacheprovider --timeout=900

test-unit: $(STAMP)
	$(BIN)/pytest -q -m "not integration and not slow"

bench: $(STAMP)
	$(BIN)/python bench/attack_cost.py
	$(BIN)/python bench/classify_latency.py

clean:
	rm -rf $(VENV) var .pytest_cache .hypothesis
