# feedloop: `make up` runs the whole loop on this machine, `make test` runs the suite.
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install install-test up demo test test-fast test-reliability soak lint typecheck bench clean readme demo-model test-charts image-cpu image-gpu

install:
	@scripts/install.sh

install-test:
	@scripts/install.sh --test

up: install
	$(BIN)/feedloop up

demo: install
	$(BIN)/feedloop demo

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy services workers demo

bench: install
	$(BIN)/python bench/chat_vs_vllm.py

clean:
	rm -rf .pytest_cache build *.egg-info

readme: install
	$(BIN)/python scripts/update_readme.py

demo-model: install
	nice -n 10 $(BIN)/python models/build_demo_model.py --force

test-reliability: install-test
	$(BIN)/python -m pytest tests/reliability $(PYTEST_ARGS)

# The soak (issue 15): the whole loop on the toy model for MINUTES, sampling RSS, LoRA adapters loaded, Redis
# memory and clients each minute; not part of `make test`. `make soak MINUTES=6`, or SOAK_ARGS="--help".
MINUTES ?= 30
SOAK_ARGS ?=
soak: install
	$(BIN)/python bench/soak.py --minutes $(MINUTES) $(SOAK_ARGS)

test-charts: install-test
	$(BIN)/python -m pytest tests/charts -m "not slow"

image-cpu:
	docker build --target cpu -t feedloop:0.1.0-cpu .

image-gpu:
	docker build --target gpu -t feedloop:0.1.0-gpu .
