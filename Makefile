# make demo: set up .venv if missing, then run the whole pipeline offline on the embedded defaults
# make test: set up .venv if missing, then run the whole test suite
# make ui:   open the Dagster UI on the same instance (http://127.0.0.1:3000)
# make bench / bench-gpu: the labeler benchmark (benchmarks/labeler.py) on the CPU / one GPU
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export DAGSTER_HOME ?= $(CURDIR)/.dagster

.PHONY: demo test ui lint clean bench bench-gpu

$(BIN)/coyo-platform: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/coyo-platform
	$(BIN)/coyo-platform demo

test: $(BIN)/coyo-platform
	$(BIN)/python -m pytest

ui: $(BIN)/coyo-platform
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

bench: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/labeler.py

bench-gpu: $(BIN)/coyo-platform
	$(BIN)/python benchmarks/labeler.py --gpu

lint: $(BIN)/coyo-platform
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf data .dagster
