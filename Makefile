# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
# A CPU build of torch on CPU-only machines; set TORCH_SPEC="torch" (or a CUDA index) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install install-dev fashion-mnist demo test bench-gpu

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dali]"

install-dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dev,dali]"

# Fashion-MNIST ships as a Debian package; installing it needs root.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set data.root"; exit 1; fi; \
	fi

demo: install fashion-mnist
	$(PYTHON) -m engine.cli train --config configs/demo.yaml checkpoint.overwrite=true

test: install-dev fashion-mnist
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q --timeout=900 --durations=15 tests

bench-gpu:
	bash bench/gpu_suite.sh
