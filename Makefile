# medgw — the two commands a new admin needs: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: demo test lint typecheck unit venv clean

$(BIN)/medgw: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "medgw needs $(PYTHON) (Python 3.11) on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

venv: $(BIN)/medgw

## Two gateways on this machine exchange a signed, encrypted document and show the receipt.
demo: venv
	$(BIN)/medgw demo --dir $(DEMO_DIR)

## The whole test suite plus ruff and mypy.
test: venv lint typecheck unit

lint: venv
	$(BIN)/ruff check gateway tests $(wildcard bench/*.py)
	$(BIN)/ruff format --check gateway tests $(wildcard bench/*.py)

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
