# Two commands: `make tune` tunes this machine, `make test` runs the test suite. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CI and CPU machines pin torch 2.13.0 (a CPU build) and triton 3.6.0 (its interpreter runs the kernel tests);
# on a GPU machine bring your own build: `make tune TORCH=torch` (any torch >= 2.4).
TORCH  ?= torch==2.13.0 triton==3.6.0
GPU    ?= auto
SHAPES ?= default
# On 2 CPU cores the search is capped at 7 minutes (shared between shapes); `make tune TUNE_BUDGET=0` lifts it.
TUNE_BUDGET ?= 420
TUNE_FLAGS ?= $(if $(TUNE_BUDGET),--time-budget $(TUNE_BUDGET))

.PHONY: tune test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(TORCH) -c constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt hatchling editables
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e '.[test]'
	touch $@

tune: $(VENV)/.installed
	$(BIN)/noflash-tune --gpu $(GPU) --shapes $(SHAPES) $(TUNE_FLAGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/python bench/tiers.py --device cpu

clean:
	rm -rf $(VENV) dist build
