# Every target installs what it needs into .venv first, so a fresh clone works with `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SIM_PORT ?= 18080
JOB ?= jobs/demo.yaml

.PHONY: install demo run test bench lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Starts the local simulator, runs the demo job against it, stops the simulator.
demo: install
	$(PY) -m batch.simulator --port $(SIM_PORT) --latency-ms 40 -- $(PY) -m batch run jobs/demo.yaml

run: install
	$(PY) -m batch run $(JOB)

# pytest exits 5 when it collects nothing; that is a failure here too.
test: install
	$(PY) -m pytest -q

bench: install
	$(PY) -m batch.bench

lint: install
	$(VENV)/bin/ruff check batch tests

clean:
	rm -rf $(VENV) out
