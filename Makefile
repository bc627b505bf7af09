# cdrsync: the two commands a new machine needs are `make demo` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
NATIVE := compose/native
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: help install system-deps python-deps stack-install up down status topics connectors \
        worker-start worker-stop monitor-start monitor-stop demo test unit integration faults bench lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

install: system-deps python-deps stack-install ## install everything: Debian packages, Python env, Maven jars

system-deps: ## Debian packages the stack needs (PostgreSQL, Prometheus, curl, JDK, Maven) when missing
	@need=""; \
	command -v curl >/dev/null || need="$$need curl"; \
	command -v java >/dev/null || need="$$need openjdk-17-jdk-headless"; \
	command -v mvn >/dev/null || need="$$need maven"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	command -v promtool >/dev/null || need="$$need prometheus"; \
	if [ -n "$$need" ]; then \
	  echo "installing:$$need"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$need; \
	  if [[ "$$need" == *prometheus* ]] && command -v systemctl >/dev/null && systemctl is-active --quiet prometheus; then \
	    $$SUDO systemctl disable --now prometheus; fi; \
	fi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

python-deps: $(BIN)/python ## the Python environment in .venv (the package, editable, with dev tools)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -e '.[dev]'

stack-install: ## resolve the stack's jars from Maven Central (once)
	bash $(NATIVE)/stack.sh install

up: install ## start PostgreSQL, Kafka, Kafka Connect + Debezium, HAPI FHIR, Prometheus; topics; connectors; monitor
	bash $(NATIVE)/stack.sh up
	$(BIN)/cdrsync topics apply
	$(BIN)/cdrsync connectors apply
	$(BIN)/cdrsync definitions apply
	bash $(NATIVE)/monitor.sh start

down: ## stop the worker, the monitor and the whole stack (data is kept in .stack/)
	-bash $(NATIVE)/worker.sh stop
	-bash $(NATIVE)/monitor.sh stop
	bash $(NATIVE)/stack.sh down

status: ## one line per service
	-bash $(NATIVE)/stack.sh status
	-bash $(NATIVE)/worker.sh status
	-bash $(NATIVE)/monitor.sh status

worker-start: ## run a stream worker in the background (log: .stack/logs/worker.log)
	bash $(NATIVE)/worker.sh start

worker-stop: ## stop the background worker
	bash $(NATIVE)/worker.sh stop

monitor-start: ## run `cdrsync monitor` in the background (source health and lag for Prometheus)
	bash $(NATIVE)/monitor.sh start

monitor-stop: ## stop the background monitor
	bash $(NATIVE)/monitor.sh stop

demo: up worker-start ## the whole pipeline end to end: FHIR (site-a, site-b), HL7 v2 (site-c) and openEHR (site-d) hospitals, then a summary
	$(BIN)/cdrsync demo load
	$(BIN)/cdrsync demo wait --timeout 600
	@echo; $(BIN)/cdrsync status || true
	@echo; echo "The stack and the worker keep running: explore with"
	@echo "  $(BIN)/cdrsync tap normalized --site site-a     (analysts' topic)"
	@echo "  curl -s 'http://localhost:8080/fhir/Patient?_count=5'"
	@echo "  $(BIN)/cdrsync status                          (one screen per route; exit 1 when one fails)"
	@echo "  http://localhost:9090/alerts                     (Prometheus: alert rules and their state)"
	@echo "  make down                                       (stop everything)"

test: install lint ## lint, then every test tier against the real stack (fault suite last): starts it, runs the tests, stops it
	@set -o pipefail; bash $(NATIVE)/stack.sh up && $(BIN)/cdrsync topics apply && $(BIN)/cdrsync connectors apply \
	  && $(BIN)/cdrsync definitions apply; \
	rc=$$?; \
	if [ $$rc = 0 ]; then $(BIN)/python -m pytest -m "not faults" $(PYTEST_ARGS); rc=$$?; fi; \
	if [ $$rc = 0 ]; then $(BIN)/python -m pytest -m faults -s $(PYTEST_ARGS) | tee .stack/logs/faults.log; rc=$$?; \
	  grep '^RECONCILIATION' .stack/logs/faults.log || true; fi; \
	bash $(NATIVE)/stack.sh down || true; \
	exit $$rc

unit: python-deps ## unit tests only (no services)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

integration: ## integration tests against an already running stack (make up)
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

faults: ## the fault-injection suite against a running stack, alone (CDRSYNC_SOAK=1 for the long soak)
	@set -o pipefail; $(BIN)/python -m pytest -m faults -s $(PYTEST_ARGS) | tee .stack/logs/faults.log; rc=$$?; \
	grep '^RECONCILIATION' .stack/logs/faults.log || true; exit $$rc

bench: install ## benchmark (issue 7): starts the stack, measures, prints the goals table, writes JSON; stops the stack (BENCH_ARGS="--help")
	bash $(NATIVE)/synthea.sh install
	@set -o pipefail; bash $(NATIVE)/stack.sh up; rc=$$?; \
	if [ $$rc = 0 ]; then \
	  ( source $(NATIVE)/env.sh && export CENTRAL_FHIR_BASE_URL="$${CENTRAL_FHIR_BASE_URL:-$$FHIR_BASE_URL}" \
	    && $(BIN)/python -m tests.bench $(BENCH_ARGS) ); rc=$$?; fi; \
	bash $(NATIVE)/stack.sh down || true; \
	exit $$rc

lint: ## ruff and mypy (make install first)
	$(BIN)/ruff check pipeline agents tests
	$(BIN)/ruff format --check pipeline agents tests
	$(BIN)/mypy

clean: down ## stop everything and delete all local state (.stack/)
	rm -rf .stack
