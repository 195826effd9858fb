# The two commands: `make demo` runs the main job, `make test` runs every test. Each does its own setup.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: demo test setup setup-libtorch setup-services bench clean-state

setup: setup-libtorch setup-services

setup-libtorch:
	@./scripts/setup-libtorch.sh

setup-services:
	@./scripts/setup-services.sh

## make demo: proxy run, then a 4x-wider target run under the paper rule (see README).
demo: setup-libtorch
	$(CARGO) run --release --bin gainguard-demo -- $(DEMO_ARGS)

## make test: every test of the workspace (unit, integration, end-to-end against real Prometheus and
## Alertmanager), the examples, promtool's rule tests, and the Python package's tests (pytest) and example.
test: setup
	$(CARGO) build --release --workspace --all-targets
	$(CARGO) test --release --workspace --no-fail-fast
	./dashboards/check.sh
	.venv/bin/python -m pytest -q python/tests
	@# One thread: on a model this small OpenMP's thread team costs more than it gains (31 s vs 4 s under load).
	OMP_NUM_THREADS=1 GAINGUARD_LISTEN=127.0.0.1:0 .venv/bin/python examples/python/nanogpt_train.py --steps 300

## make bench: the benchmarks recorded in BENCHMARKS.md (not part of make test).
bench: setup
	$(CARGO) bench --bench optimizer_step
	$(CARGO) bench --bench spectra
