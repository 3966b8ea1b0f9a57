# Two commands: `make tune` tunes this machine, `make test` runs the test suite. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CI and this repo's CPU machines pin torch 2.13.0; a GPU user overrides TORCH=torch (any torch >= 2.4).
TORCH  ?= torch==2.13.0
GPU    ?= auto
SHAPES ?= default
TUNE_FLAGS ?=

.PHONY: tune test bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" -c constraints.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt hatchling editables
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e '.[test]'
	touch $@

tune: $(VENV)/.installed
	$(BIN)/noflash-tune --gpu $(GPU) --shapes $(SHAPES) $(TUNE_FLAGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/noflash-tune bench

clean:
	rm -rf $(VENV) dist build
