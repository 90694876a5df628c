# The two commands of the README: `make demo` (the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/fashion-mnist.yaml
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
export FASHION_MNIST_DIR

.PHONY: setup fonts demo typefaces typefaces-1000 typefaces-iid typefaces-iid-1000 test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/specialists run --config $(CONFIG) --set data.source=fashion-mnist:$(FASHION_MNIST_DIR)

fonts:
	@bash scripts/install-fonts.sh

# Thousands of classes: GB2312 characters rendered from Debian's CJK typefaces (docs/RESULTS.md).
typefaces: setup fonts
	$(BIN)/specialists run --config configs/typefaces.yaml

typefaces-1000: setup fonts
	$(BIN)/specialists run --config configs/typefaces-1000.yaml

# The paper's regime: the same characters split i.i.d. (every typeface in every split), a
# capacity-limited generalist trained to a plateau (docs/RESULTS.md, "The paper's regime").
typefaces-iid: setup fonts
	$(BIN)/specialists run --config configs/typefaces-iid.yaml

typefaces-iid-1000: setup fonts
	$(BIN)/specialists run --config configs/typefaces-iid-1000.yaml

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check specialists clustering inference tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_data.py

clean:
	rm -rf runs data .pytest_cache
