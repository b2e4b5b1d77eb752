# s2clip — every target installs what it needs first, so each is one command on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s2clip-installed

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest

# Segments an example photo with real weights; without them, says in one line what to fetch.
demo: install
	$(VENV)/bin/s2clip segment examples/cat.jpg --classes @examples/cat_classes.txt -o out/demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_sam.py
	$(PY) benchmarks/bench_eval.py

clean:
	rm -rf $(VENV) out bench-results .pytest_cache
