# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
# A CPU build of torch on CPU-only machines; set TORCH_SPEC="torch" (or a CUDA index) on GPU machines.
TORCH_SPEC ?= torch==2.13.0
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: install install-dev fashion-mnist demo test test-avx2 gpu-prep bench-gpu

install:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -e ".[dali]"

# timm pulls torchvision, whose newest release asks for a newer torch: the installed torch is pinned (a
# constraints file), so pip picks the torchvision of that torch and never replaces torch (README, timm).
TORCH_PIN := build/torch-pin.txt
install-dev:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	@mkdir -p build && $(PYTHON) -c "import torch; print('torch==' + torch.__version__)" > $(TORCH_PIN)
	$(PYTHON) -m pip install -c $(TORCH_PIN) -e ".[dev,dali,timm]"

# Fashion-MNIST ships as a Debian package; installing it needs root.
fashion-mnist:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST missing: run 'sudo apt-get install dataset-fashion-mnist' or set data.root"; exit 1; fi; \
	fi

demo: install fashion-mnist
	$(PYTHON) -m engine.cli train --config configs/demo.yaml checkpoint.overwrite=true

# tests/conftest.py selects the Triton interpreter only where torch sees no GPU: on a GPU the kernels are compiled.
# The numerics tests run a second time narrowed to AVX2 (ATen, oneDNN and inductor's generated C++ alike), so a
# tolerance that only an AVX-512 CPU meets fails here rather than on the next machine (tests/README.md).
AVX2_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
NUMERICS_TESTS := tests/test_isa.py tests/test_kernels.py tests/test_kernels_objective.py \
	tests/test_kernels_methods.py tests/test_byot_loss.py tests/test_methods_losses.py tests/test_methods_beta.py \
	tests/test_methods_cskd.py tests/test_step.py tests/test_train.py tests/test_precision.py tests/test_ddp.py \
	tests/test_models.py tests/test_early_exit.py
test: install-dev fashion-mnist
	$(PYTHON) -m pytest -q --timeout=900 --durations=15 tests
	$(AVX2_ENV) $(PYTHON) -m pytest -q --timeout=900 --durations=5 $(NUMERICS_TESTS)

test-avx2:
	$(AVX2_ENV) $(PYTHON) -m pytest -q --timeout=900 --durations=5 $(NUMERICS_TESTS)

# What must travel with the tree to the GPU machine (bench/GPU.md), all git-ignored: under .whl/ Liger's wheel
# (installed there with --no-deps) and the commit, since the copy arrives without .git; under .dali/ DALI for the
# machine's Python 3.12 in parts of <= 48 MiB, carried one per call (bench/dali_parts.sh).
LIGER_WHEEL := liger_kernel-0.8.5-py3-none-any.whl
gpu-prep:
	@bash bench/dali_parts.sh prepare
	@mkdir -p .whl
	@test -f .whl/$(LIGER_WHEEL) || $(PYTHON) -m pip download -q --no-deps liger-kernel==0.8.5 -d .whl
	@{ git rev-parse HEAD | tr -d '\n'; git diff --quiet HEAD -- || printf -- '-dirty'; echo; } > .whl/COMMIT
	@echo "gpu-prep: .whl/ holds $$(ls .whl | tr '\n' ' ')(commit $$(cat .whl/COMMIT))"

bench-gpu:
	bash bench/gpu_suite.sh
