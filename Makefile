# ferry — make targets. `make run LIST=images.txt TARGET=registry.example.com/mirror` and `make test`.
PY := .venv/bin/python
PYTEST := $(PY) -m pytest
export PYTHONDONTWRITEBYTECODE := 1

LIST ?= images.txt
TARGET ?=
WORKERS ?= 2
CONCURRENCY ?= 4
POOL ?= prefork
# The benchmarks run workers as "Worker sizing" in the README recommends for mirroring.
BENCH_POOL ?= threads
BENCH_CONCURRENCY ?= 16
# Benchmarked commands start from cached bytecode, as an installed ferry does.
BENCH_ENV := env -u PYTHONDONTWRITEBYTECODE FERRY_POOL=$(BENCH_POOL)
# More bench.py options, e.g. BENCH_ARGS="--profile lan --contenders project,skopeo-p8".
BENCH_ARGS ?=

.PHONY: venv run worker flower beat test test-fast test-slow test-faults test-docker test-cluster measure \
	test-metrics test-schedules test-selectors test-hosts measure-hosts test-deploy lint fmt bench bench-fleet clean

venv: .venv/.stamp
.venv/.stamp: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,standalone]'
	touch $@

## Mirror LIST to TARGET on this machine (standalone unless FERRY_BROKER_URL is set).
run: venv
	@test -n "$(TARGET)" || { echo "usage: make run LIST=images.txt TARGET=registry.example.com/mirror"; exit 2; }
	$(PY) -m producer enqueue $(LIST) --target $(TARGET) --wait

worker: venv
	$(PY) -m workers --concurrency $(CONCURRENCY) --pool $(POOL)

flower: venv
	$(PY) -m workers flower

beat: venv
	$(PY) -m workers beat

## Every suite (what CI runs).
test: venv
	$(PYTEST) -q -p no:cacheprovider

test-fast: venv
	$(PYTEST) -q -m "not slow and not faults and not docker and not cluster and not metrics and not schedules and not selectors and not hosts and not deploy"

test-slow: venv
	$(PYTEST) -q -m slow

test-faults: venv
	$(PYTEST) -q -m faults

test-docker: venv
	$(PYTEST) -q -m docker

test-cluster: venv
	$(PYTEST) -q -m cluster

## The tests that measure the README's figures, printing each (they assert them too, in `make test`).
measure: venv
	$(PYTEST) -q -s -p no:cacheprovider -m measure

test-metrics: venv
	$(PYTEST) -q -m metrics

test-schedules: venv
	$(PYTEST) -q -m schedules

test-selectors: venv
	$(PYTEST) -q -m selectors

## Workers, registries and Redis on separate network hosts (network namespaces; needs root and iproute2).
test-hosts: venv
	$(PYTEST) -q -m hosts

## The scaling curve across 1, 2 and 3 worker hosts that the README reports.
measure-hosts: venv
	$(PYTEST) -q -s -p no:cacheprovider -m "hosts and measure"

## The image, compose file, Kubernetes manifests and systemd unit, for real (prints each phase's time).
test-deploy: venv
	$(PYTEST) -q -m deploy

lint: venv
	$(PY) -m ruff check config contract producer workers tests
	$(PY) -m mypy config contract producer workers

fmt: venv
	$(PY) -m ruff check --fix config contract producer workers tests

bench: venv
	$(BENCH_ENV) $(PY) ../shared/bench/bench.py --project . --workers $(WORKERS) --concurrency $(BENCH_CONCURRENCY) \
		--json bench.json $(BENCH_ARGS)

## 10,000 small images, cold and warm: the per-image cost at mirror-list scale.
bench-fleet: venv
	$(BENCH_ENV) $(PY) ../shared/bench/bench.py --project . --corpus fleet --count 10000 --contenders project \
		--workers $(WORKERS) --concurrency $(BENCH_CONCURRENCY) --json bench-fleet.json

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
