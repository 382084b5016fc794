# Set-up and everyday commands. `make demo` and `make test` install everything they need into .venv.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; set TORCH_SPEC to bring your own (e.g. TORCH_SPEC="torch==2.5.1").
TORCH_SPEC ?= torch==2.13.0
CORES ?= 2
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN := PATH="$(abspath $(BIN)):$$PATH"

.PHONY: install demo test test-fast lint

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(RUN) snakemake --cores $(CORES)

test: $(STAMP)
	$(RUN) pytest

# About a minute: the tests that need no DeepSpeed training and no SLURM cluster, on two processes.
test-fast: $(STAMP)
	$(RUN) pytest -m "not deepspeed and not slurm" -n 2

lint: $(STAMP)
	$(RUN) snakemake --lint
	$(RUN) snakefmt --check .
