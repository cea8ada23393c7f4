# medgw — the two commands a new admin needs: `make demo` and `make test`.
# The interpreter: PYTHON=... (command line or environment) to choose one; otherwise
# the existing $(VENV) is kept, or made with the newest of python3.13, python3.12,
# python3.11 on PATH (tools/make-venv says what is missing when none fits).
PYTHON_ARG := $(if $(filter undefined,$(origin PYTHON)),,$(PYTHON))
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_DIR ?= demo

.PHONY: demo test lint typecheck unit venv clean fuzz

# sslyze (the TLS scanner of tests/test_tls_scan.py) pins an older cryptography than
# medgw needs, so it gets an environment of its own (made from the same interpreter;
# made again with $(VENV)).  Where it cannot be installed, those tests are skipped and
# say why; under CI (MEDGW_EVERY_TEST_RUNS set by .ci/run) a skip is a failure.
SSLYZE_REQ ?= sslyze>=6.1,<7

venv:
	@sh tools/make-venv '$(VENV)' '$(PYTHON_ARG)'
	@[ -x $(VENV)/scan/bin/python ] || { $(BIN)/python -m venv $(VENV)/scan && \
	  { $(VENV)/scan/bin/pip install --quiet '$(SSLYZE_REQ)' || \
	    echo "warning: sslyze could not be installed; the TLS scan tests will be skipped (failed where MEDGW_EVERY_TEST_RUNS is set, as in CI)" >&2; }; }

## Two gateways on this machine exchange a signed, encrypted document and show the receipt.
demo: venv
	$(BIN)/medgw demo --dir $(DEMO_DIR)

## The whole test suite plus ruff and mypy.
test: venv lint typecheck unit

lint: venv
	$(BIN)/ruff check gateway tests fuzz $(wildcard bench/*.py)
	$(BIN)/ruff format --check gateway tests fuzz $(wildcard bench/*.py)

typecheck: venv
	$(BIN)/mypy

## The whole suite once (CI, .ci/run: on the oldest supported Python, and the tests of
## what differs between Python versions again on the newest).
unit: venv
	$(BIN)/pytest -q

## The long fuzzing run (fuzz/README.md): each target for FUZZ_SECONDS, corpus kept in fuzz/work/.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= cms smime as2 mdn config
fuzz: venv
	@for t in $(FUZZ_TARGETS); do $(BIN)/python -m fuzz run $$t --seconds $(FUZZ_SECONDS) || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .mypy_cache .ruff_cache
