# keyplane — the targets a newcomer can guess.
#   make run    set up .venv, install, generate the API, start a server on 127.0.0.1:7443
#               (admin console: https://127.0.0.1:7445/, sign in with 'keyplane console login')
#   make test   the same set-up plus SoftHSM and Chromium, then the whole suite
#   make test-long  the fault tests long: 100 kills of each kind, 10x the bursts, 1 h soak
#   make lint   ruff, mypy and the import layers
#   make proto  regenerate keyplane.v1 from proto/
#   make bench  benchmarks against cfssl and the crypto ceiling (bench/README.md)
#   make test-secrets  a representative part of the suite with debug logging, then a
#               search of everything it left for private keys, PINs and passwords
#   make fuzz   every fuzz target for FUZZ_SECONDS (300) each (README, "Fuzzing")
#   make clean  remove the venv, generated code and local data

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.keyplane-installed
DATA_DIR ?= var
LISTEN ?= 127.0.0.1:7443
CONSOLE_LISTEN ?= 127.0.0.1:7445
PYTEST_ARGS ?=

.PHONY: install run test test-long lint proto system-test-deps bench bench-deps fuzz test-secrets clean

$(BIN)/python:
	@echo "==> creating the virtualenv $(VENV)"
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	    scripts/system-packages.sh /usr/lib/python3/dist-packages/ensurepip=python3-venv && \
	    rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard proto/keyplane/v1/*.proto)
	@echo "==> [1/2] updating pip in $(VENV)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@echo "==> [2/2] installing keyplane, its dependencies and the generated API" \
	    "(a minute or two the first time)"
	@$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

install: $(STAMP)

run: install
	@echo "==> starting keyplane serve --data-dir $(DATA_DIR) --listen $(LISTEN)" \
	    "--console-listen $(CONSOLE_LISTEN) (the first start makes the roots and keys: a few seconds)"
	@$(BIN)/keyplane serve --data-dir $(DATA_DIR) --listen $(LISTEN) --console-listen $(CONSOLE_LISTEN)

system-test-deps:
	@scripts/system-packages.sh softhsm2-util=softhsm2 pkcs11-tool=opensc openssl=openssl \
	    go=golang-go certutil=libnss3-tools cfssl=golang-cfssl systemd-analyze=systemd chromium=chromium \
	    faketime=faketime

test: install system-test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The fault tests (tests/test_fault_*.py, tests/test_cancellation.py) long: FAULT_RUNS
# kills of each kind (200 of the enrollment bursts), bursts of given-up calls ten times
# larger, and the soak for SOAK_SECONDS (an hour).
FAULT_RUNS ?= 100
SOAK_SECONDS ?= 3600
test-long: install system-test-deps
	KEYPLANE_FAULT_RUNS=$(FAULT_RUNS) KEYPLANE_SOAK_SECONDS=$(SOAK_SECONDS) \
	    $(BIN)/python -m pytest -rP tests/test_fault_*.py tests/test_cancellation.py \
	    $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@# mypy cannot follow setuptools' editable finder for our mapped package dirs, so it
	@# checks a tree of links that has the import layout (keyplane/server -> server, ...).
	@rm -rf build/typecheck && mkdir -p build/typecheck/keyplane
	@for d in server plugins clients zone; do ln -s ../../../$$d build/typecheck/keyplane/$$d; done
	@ln -s ../../../gen/keyplane/v1 build/typecheck/keyplane/v1
	cd build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml \
	    -p keyplane.server -p keyplane.plugins -p keyplane.clients -p keyplane.zone
	@# The layers of DESIGN.md, over the same tree (contracts in pyproject.toml).
	cd build/typecheck && PYTHONPATH=. ../../$(BIN)/lint-imports ../../pyproject.toml

# Benchmarks: one table, medians, ratios; BENCH_QUICK=1 for a short try (bench/README.md).
bench-deps:
	@scripts/system-packages.sh cfssl=golang-cfssl softhsm2-util=softhsm2 h2load=nghttp2-client

bench: install bench-deps
	$(BIN)/python -m bench.run

# The secret scan (README, "Secret scan"): SECRET_TESTS=tests for the whole suite.
SECRET_TESTS ?= tests/test_enrollment.py tests/test_renew_with_proof.py tests/test_agent.py \
    tests/test_backup.py tests/test_backup_hsm.py tests/test_server_hsm.py \
    tests/test_password_change.py tests/test_locked_start.py tests/test_identities.py \
    tests/test_signing_and_trust.py tests/test_trust_exchange.py tests/test_zones_cli.py \
    tests/test_audit_cli.py tests/test_cli.py tests/test_hostile_input.py tests/test_rotation.py

test-secrets: install system-test-deps
	rm -rf build/secret-scan
	$(BIN)/python -m pytest -p tests.secret_scan_plugin --basetemp=build/secret-scan/tmp \
	    $(PYTEST_ARGS) $(SECRET_TESTS)

# Fuzzing: each parser of untrusted bytes (fuzz/), FUZZ_SECONDS each, or a count of runs
# with FUZZ_ARGS="--runs 1000000"; crashes are left in build/fuzz/crashes/.
FUZZ_SECONDS ?= 300
FUZZ_ARGS ?=

fuzz: install
	FUZZ_SECONDS=$(FUZZ_SECONDS) $(BIN)/python -m fuzz $(FUZZ_ARGS)

proto: $(BIN)/python
	$(BIN)/python -c 'import runpy; runpy.run_path("setup.py", run_name="keyplane_generate_only")'

clean:
	rm -rf $(VENV) gen build *.egg-info .pytest_cache .mypy_cache .ruff_cache
