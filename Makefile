# outbox_ext — see README.md.
SHELL := /bin/bash
export CARGO_TARGET_DIR ?= $(HOME)/.cache/outbox_ext/target

.PHONY: demo test install deps bench bench-profile

## Install what is missing, build, and show events flowing from SQL to a local dev broker.
demo: deps
	bash scripts/demo.sh

## Run every test suite (unit, in-database, integration).
test: deps
	bash scripts/test.sh

## Build in release mode and install into the system PostgreSQL 15.
install: deps
	bash -c '. scripts/common.sh && install_extension --release'

deps:
	bash scripts/install-deps.sh

## Measure writer overhead, drain rate, latency and worker memory (about 8 minutes after the build).
bench: deps
	bash scripts/bench.sh

## Count the writer's instructions per transaction with callgrind (about 2 minutes).
bench-profile: deps
	bash scripts/profile.sh
