# One-command set-up: every target creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: set up .venv and run the main job (planted ReLU, QSGD, 8 devices)
run: $(STAMP)
	$(PY) -m jrelu.train --workdir=runs/default

## test: set up .venv and run the test suite
# Only the two plugins the suite uses are loaded: pytest rewrites the asserts of every
# module of an autoloaded plugin's package (hypothesis: ~70 modules, ~5 s per worker).
test: $(STAMP)
	PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 $(PY) -m pytest -p xdist.plugin -p _hypothesis_pytestplugin \
	  -q -n 2 --dist loadgroup

## bench: set up .venv with the bench extra (torch==2.13.0, scikit-learn) and run the quick benchmarks
bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m benchmarks.step_throughput --quick --outdir=runs/bench/step_throughput
	$(PY) -m benchmarks.compressors --quick --outdir=runs/bench/compressors
	$(PY) -m benchmarks.reproduce --quick --outdir=runs/bench/reproduce
	$(PY) -m benchmarks.real_data --quick --outdir=runs/bench/real_data

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
