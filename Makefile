# make demo: set up .venv if missing, then run the whole pipeline offline on the embedded defaults
# make test: set up .venv if missing, then run the whole test suite
# make ui:   open the Dagster UI on the same instance (http://127.0.0.1:3000)
# make bench / bench-gpu: the labeling benchmark (benchmarks/label.py) on the CPU / one GPU
# make bench-stats: label stats and the target threshold vs DuckDB (benchmarks/stats.py)
# make bench-download: the guarded download program vs img2dataset's own (benchmarks/download.py):
#   CPU-bound on one loopback server, then a realistic web (64 hosts, TLS, latency, stalls)
# make bench-scale: the sensors' ticks on a full run's layout, folder and S3 (benchmarks/scale.py)
# make bench-wds: the webdataset shards of the kept images, speed and memory (benchmarks/wds.py)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# cfn-lint and checkov check infra/; checkov pins an older boto3 than the project's, so they live
# in their own environment.
TOOLS := .venv-tools
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: demo test ui lint clean bench bench-gpu bench-stats bench-download bench-scale bench-wds chromium

$(BIN)/coyo-platform: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

$(TOOLS)/bin/checkov:
	test -x $(TOOLS)/bin/python || $(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet --upgrade pip
	$(TOOLS)/bin/python -m pip install --quiet checkov==3.3.30 cfn-lint==1.58.0
	touch $@

demo: $(BIN)/coyo-platform
	$(BIN)/coyo-platform demo

# Debian's chromium, for the UI test (a real browser on the Dagster webserver).
chromium:
	command -v chromium >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; } \
	  || { sudo apt-get update -q && sudo apt-get install -y -q --no-install-recommends chromium; }

# Two test processes (this machine kind has 2 cores), each taking whole test files; the files that
# read one session-wide run go to the same one (coyo_platform_tests/conftest.py, SHARED_RUNS).
test: $(BIN)/coyo-platform $(TOOLS)/bin/checkov chromium
	$(BIN)/python -m pytest -n 2 --dist loadfile

ui: $(BIN)/coyo-platform
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/label.py

bench-gpu: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/label.py --gpu

bench-stats: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/stats.py

bench-download: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/download.py
	$(BIN)/python benchmarks/download.py --web

bench-scale: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/scale.py
	$(BIN)/python benchmarks/scale_stages.py

bench-wds: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/wds.py --json benchmarks/results/wds.json

lint: $(BIN)/coyo-platform
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf data .dagster
