.PHONY: setup demo test bench lint clean

PY := .venv/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@.venv/bin/xshard demo

test: setup
	@$(PY) -m pytest -q

bench: setup
	@$(PY) -m benchmarks.overhead_breakdown
	@$(PY) -m benchmarks.hop_overhead
	@$(PY) -m benchmarks.minilm_latency
	@$(PY) -m benchmarks.recovery
	@$(PY) -m benchmarks.scaling
	@$(PY) -m benchmarks.component_dag
	@$(PY) -m benchmarks.big_model
	@$(PY) -m benchmarks.generation
	@$(PY) -m benchmarks.precision

lint: setup
	@.venv/bin/ruff format --check broker coordinator shard_worker tests benchmarks
	@.venv/bin/ruff check broker coordinator shard_worker tests benchmarks
	@.venv/bin/mypy broker coordinator shard_worker
	@.venv/bin/mypy --strict broker
	@.venv/bin/lint-imports --no-cache
	@$(PY) scripts/check_size.py

clean:
	rm -rf .venv node_modules .pytest_cache
