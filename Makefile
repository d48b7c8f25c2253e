# outbox_ext — see README.md. PG=15|16|17|18 selects the PostgreSQL version (default: 15 for
# demo, bench and install; every version for test and package).
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outbox_ext/target

.PHONY: demo test install deps bench bench-databases bench-restart bench-profile bench-drain-profile package monitoring-picture

## Install what is missing, build, and show events flowing from SQL to a local dev broker.
demo: deps
	bash scripts/demo.sh

## Run every test suite (unit, in-database, integration) on every version, or on PG=NN.
test: deps
	bash scripts/test.sh

## Build in release mode and install into PostgreSQL $(PG) (default 15, the system's).
install: deps
	bash -c '. scripts/common.sh && install_extension --release'

deps:
	bash scripts/install-deps.sh

## Measure writer overhead, drain rate, latency and worker memory (about 9 minutes after the build).
bench: deps
	bash scripts/bench.sh

## Only the drain's limits (D, N, K, R), each drain profiled with perf: where each microsecond of an event goes.
bench-drain-profile: deps
	BENCH_ONLY=limits BENCH_PERF=1 bash scripts/bench.sh

## Only the several-databases part of the bench: idle CPU and memory of 10 relays, 4 × 250k vs 1 × 1M drain.
bench-databases: deps
	bash scripts/bench-databases.sh

## What reading partition tails (outbox.exactly_once) costs a restart: 100 topics × 3 partitions, on vs off.
bench-restart: deps
	bash scripts/bench-restart.sh

## Count the writer's instructions per transaction with callgrind (about 2 minutes).
bench-profile: deps
	bash scripts/profile.sh

## Draw the Grafana dashboard's queries from 4 minutes of real data with Prometheus in headless Chromium (needs chromium).
monitoring-picture: deps
	bash scripts/monitoring-picture.sh

## Build the .deb and .tar.gz of every version (or PG=NN) into packages/.
package: deps
	bash scripts/package.sh
