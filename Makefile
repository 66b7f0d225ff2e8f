# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
# A CPU build of torch on CPU-only machines; set TORCH_SPEC="torch" (or a CUDA index) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install install-dev fashion-mnist demo test gpu-prep bench-gpu

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

# tests/conftest.py selects the Triton interpreter only where torch sees no GPU: on a GPU the kernels are compiled.
test: install-dev fashion-mnist
	$(PYTHON) -m pytest -q --timeout=900 --durations=15 tests

# What must travel with the tree to the GPU machine (bench/GPU.md), all under the git-ignored .whl/: Liger's wheel
# (installed there with --no-deps) and the commit, since the copy arrives without .git.
LIGER_WHEEL := liger_kernel-0.8.5-py3-none-any.whl
gpu-prep:
	@mkdir -p .whl
	@test -f .whl/$(LIGER_WHEEL) || $(PYTHON) -m pip download -q --no-deps liger-kernel==0.8.5 -d .whl
	@{ git rev-parse HEAD | tr -d '\n'; git diff --quiet HEAD -- || printf -- '-dirty'; echo; } > .whl/COMMIT
	@echo "gpu-prep: .whl/ holds $$(ls .whl | tr '\n' ' ')(commit $$(cat .whl/COMMIT))"

bench-gpu:
	bash bench/gpu_suite.sh
