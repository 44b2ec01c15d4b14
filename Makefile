# imagebus — make demo | make test | make bench | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on these machines it lies on local disk. Override for CUDA:
#   make TORCH=torch install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-faults bench lint format typecheck up clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e '.[worker,embedded,web,test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/imagebus up --workers 3 --model tiny --interactive

up: $(STAMP)
	$(VENV)/bin/imagebus up --workers 3 --model tiny

# The browser tests (tests/test_web_browser.py) drive Debian's chromium through
# Playwright (whose own browser download is not available): install it when missing.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "installing chromium for the browser tests (apt-get)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

test: $(STAMP) browser
	$(PY) -m pytest -q

# Only the fault-injection suite (also part of `make test`), printing its figures.
test-faults: $(STAMP)
	IMAGEBUS_TEST_LOG_LEVEL=error $(PY) -m pytest -q -s -m faults

# Benchmarks (not tests): writes BENCHMARKS.md; a few minutes on a 2-core machine.
bench: $(STAMP)
	$(PY) -m bench.run

lint: $(STAMP)
	$(VENV)/bin/ruff check imagebus tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format imagebus tests bench
	$(VENV)/bin/ruff check --fix imagebus tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy imagebus bench

clean:
	rm -rf $(VENV) .imagebus generated .pytest_cache
