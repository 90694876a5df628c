# The two commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/fashion-mnist.yaml
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export FASHION_MNIST_DIR

.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/specialists run --config $(CONFIG) --set data.source=fashion-mnist:$(FASHION_MNIST_DIR)

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check specialists clustering inference tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf runs data .pytest_cache
