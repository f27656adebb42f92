# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/fxcompress: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]"
	touch $@

.PHONY: demo test zoo
demo: $(BIN)/fxcompress
	$(BIN)/fxcompress demo --out out/demo

test: $(BIN)/fxcompress
	$(BIN)/python -m pytest -q

zoo: $(BIN)/fxcompress
	$(BIN)/python -m pytest -q -m zoo
