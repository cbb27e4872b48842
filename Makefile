# make demo: segment a real example CT on the CPU.  make test: run every test.  Both set up .venv.
# make release: the release repository that the Extensions Index clones (docs/release.md); prints its path last.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test bench release clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) scripts/demo.py --out demo-output

test: venv
	$(PY) -m pytest -q Testing/Python

bench: venv
	$(PY) bench/bench_cli.py

release: venv
	$(PY) scripts/release.py --out build/release

clean:
	rm -rf demo-output .pytest_cache
