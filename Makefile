# vpnd: two commands on a fresh machine: `make demo` and `make test`.
# Both install everything they need (Debian packages, a venv, pip packages).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_STAMP := .apt-installed
# iproute2/nftables/ping for the netns suite; openssh-server for provisioning tests.
APT_PACKAGES := iproute2 iputils-ping nftables openssl openssh-server openssh-client procps kmod

.PHONY: all install apt venv test lint typecheck unit netns demo bench bench-deps bench-scale fuzz clean

all: test

apt: $(APT_STAMP)
$(APT_STAMP): Makefile
	@scripts/install-apt.sh $(APT_PACKAGES)
	@touch $@

venv: $(STAMP)
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

install: apt venv

LINT_DIRS := $(wildcard vpnd vpnctl tests netns-tests bench scripts)

# lint-imports checks the layering contracts in pyproject.toml [tool.importlinter];
# no cache, it takes half a second.
lint: venv
	$(VENV)/bin/ruff check $(LINT_DIRS)
	$(VENV)/bin/ruff format --check $(LINT_DIRS)
	$(VENV)/bin/lint-imports --no-cache --no-logo

typecheck: venv
	$(VENV)/bin/mypy --strict vpnd vpnctl tests

# The daemon's lifecycle modules (vpnd/service) must stay at 80 % line coverage from the
# unit tests alone: the netns suite is not a substitute for testing them over the fakes.
COVERAGE := --cov=vpnd.service --cov-report=term --cov-fail-under=80
unit: venv
	scripts/run-pytest tests $(COVERAGE)

netns: install
	scripts/run-pytest netns-tests

test: install lint typecheck unit netns

demo: install
	$(PY) scripts/demo.py

# Benchmarks (root; never part of `make test`). See bench/README.md.
BENCH_APT := iperf3 openvpn wireguard-go wireguard-tools iputils-ping
BENCH_ARGS ?=
bench-deps: install
	@scripts/install-apt.sh $(BENCH_APT)
	$(PY) -m pip install -q -e '.[dev,bench]'

bench: bench-deps
	$(PY) -m bench.run $(BENCH_ARGS)

bench-scale: bench-deps
	$(PY) -m bench.scale $(BENCH_ARGS)

# Property tests only, with the long `fuzz` hypothesis profile (tests/conftest.py):
# FUZZ_EXAMPLES examples per test, in FUZZ_JOBS round-robin shards side by side.
# Findings are saved in .hypothesis/ and replay first on the next run.
FUZZ_EXAMPLES ?= 20000
FUZZ_JOBS ?= 2
fuzz: venv
	@mkdir -p .hypothesis; pids=(); for i in $$(seq 0 $$(($(FUZZ_JOBS) - 1))); do \
	  HYPOTHESIS_PROFILE=fuzz FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FUZZ_SHARD=$$i/$(FUZZ_JOBS) \
	    scripts/run-pytest tests -q --hypothesis-show-statistics \
	    > .hypothesis/fuzz-shard-$$i.log 2>&1 & pids+=($$!); done; \
	rc=0; for p in "$${pids[@]}"; do wait $$p || rc=1; done; \
	for i in $$(seq 0 $$(($(FUZZ_JOBS) - 1))); do \
	  grep -E "^(tests/|  - |[0-9]+ (passed|failed))|FAILED|Falsifying" .hypothesis/fuzz-shard-$$i.log; done; \
	exit $$rc

clean:
	rm -rf $(VENV) $(APT_STAMP) .mypy_cache .ruff_cache .pytest_cache
