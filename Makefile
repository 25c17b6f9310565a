# histotoken: the two commands a new user needs are `make demo` and `make test`.
# Both create the project's virtual environment in .venv on first use.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: install demo test test-extra test-slurm lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)  ## synthetic BreakHis -> model grid -> report.html
	$(BIN)/histotoken demo --out $(DEMO_OUT)

test: $(STAMP)  ## the test suite (CPU, tiny images and models), in two processes of one thread each
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not timm_suite and not inductor and not slurm"

test-extra: $(STAMP)  ## slow checks CI also runs: timm's own model tests on our families, torch.compile (inductor)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "timm_suite or inductor"

test-slurm: $(STAMP)  ## a grid on a real single-node SLURM (start it first: bash .ci/slurm.sh start; about 4 minutes)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slurm tests/test_slurm_real.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)  ## README efficiency table at 224 px (slow: minutes on a 2-core CPU)
	$(BIN)/python benchmarks/efficiency_table.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache .ruff_cache
