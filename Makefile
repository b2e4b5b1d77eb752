# s2clip — every target installs what it needs first, so each is one command on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.s2clip-installed

.PHONY: install install-sam2 test test-slow test-floors test-browser demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev,serve,masks]'
	$(MAKE) install-sam2
	touch $(STAMP)

# SAM 2 (corrclip's mask generator). PyPI's sam2 is a source package whose isolated build fails; it
# builds against the installed torch (no CUDA extension: SAM 2 runs without it) once `wheel` is there.
SAM2_PIN := sam2==1.1.0
install-sam2:
	$(PY) -m pip install --quiet wheel
	SAM2_BUILD_CUDA=0 $(PY) -m pip install --quiet --no-build-isolation '$(SAM2_PIN)'
	$(PY) -c "import sam2.automatic_mask_generator"

# make test: everything but the slow end-to-end cases (tests/conftest.py SLOW_TESTS), ~10 minutes on
# 2 cores; make test-slow: only those; .ci/run runs both.
test: install
	$(PY) -m pytest -m "not slow"

test-slow: install
	$(PY) -m pytest -m slow

# The model-loading and pipeline tests against the lowest open_clip and timm that pyproject admits
# (torch stays the installed one), so that a dependency floor that lies fails CI.
FLOORS := .venv-floors
FLOOR_PINS := open_clip_torch==2.27.0 timm==1.0.9
FLOOR_TESTS := tests/test_weights.py tests/test_pos_embed.py tests/test_segment_cli.py tests/test_windows_fusion.py
test-floors: install
	rm -rf $(FLOORS)
	$(PY) -m pip install --quiet --no-deps --target $(FLOORS) $(FLOOR_PINS)
	PYTHONPATH=$(FLOORS) $(PY) -c "import open_clip, timm; print('floors: open_clip', open_clip.__version__, 'timm', timm.__version__)"
	PYTHONPATH=$(FLOORS) $(PY) -m pytest -p no:cacheprovider -W ignore::DeprecationWarning $(FLOOR_TESTS)

# `s2clip serve`'s page in a real headless Chromium (Debian's packages; needs root for apt-get).
test-browser: install
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver)
	$(PY) -m pip install --quiet selenium
	S2CLIP_REQUIRE_BROWSER=1 $(PY) -m pytest tests/test_serve_browser.py -rs

# Segments an example photo with real weights; without them, says in one line what to fetch.
demo: install
	$(VENV)/bin/s2clip segment examples/cat.jpg --classes @examples/cat_classes.txt -o out/demo

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

bench: install
	$(PY) benchmarks/bench_pipeline.py
	$(PY) benchmarks/bench_sam.py
	$(PY) benchmarks/bench_sd_propagate.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_eval.py
	$(PY) benchmarks/bench_corrclip.py
	$(PY) benchmarks/bench_sam_encoder.py
	$(PY) benchmarks/bench_methods_new.py
	@if [ -n "$(REFS)" ]; then $(PY) benchmarks/bench_references.py --refs "$(REFS)"; \
	else echo "bench_references: skipped (make bench REFS=DIR with the reference repositories cloned in DIR)"; fi

clean:
	rm -rf $(VENV) $(FLOORS) out bench-results .pytest_cache
