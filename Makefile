# imagebus — make demo | make test | make bench | make lint
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; on these machines it lies on local disk. Override for CUDA:
#   make TORCH=torch install
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test test-faults bench lint format typecheck up clean

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

test: $(STAMP)
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
