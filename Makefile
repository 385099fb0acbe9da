# Two commands for a fresh machine:
#   make demo   installs, runs the embedded default study, fits the law
#   make test   installs, runs the test suite (what .ci/run calls)
# While working:
#   make lint       ruff (configured in pyproject.toml) over the package, the tests and the benchmarks
#   make test-fast  the tests that need neither Ray nor real training (markers ray and real deselected)
# Options: make install PYTHON=python3.12 TORCH_INDEX=https://download.pytorch.org/whl/cu128

SUPPORTED_PYTHON := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 13))
# The first of these that runs and is 3.11 to 3.13 (3.11 first: the version the tests pin torch for)
ifndef PYTHON
PYTHON := $(firstword $(foreach candidate,python3.11 python3.12 python3.13 python3,\
	$(shell $(candidate) -c '$(SUPPORTED_PYTHON)' >/dev/null 2>&1 && echo $(candidate))))
endif
TORCH ?= torch==2.13.0
# Where torch comes from: empty means a wheel pip already finds locally, else on a machine with an NVIDIA driver
# pip's index (PyPI's Linux wheels are CUDA builds), else PyTorch's CPU index (PyPI's would bring CUDA: GBs)
TORCH_INDEX ?=
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
DEEPSPEED := deepspeed==0.19.8
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint test-fast

install: $(STAMP)

# torch first, then the package, then DeepSpeed built against that torch, then the extras (DeepSpeed already
# satisfies `train`), and the op DeepSpeed would otherwise build in the first trial (its CPU comm op: a minute)
$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11, python3.12 or python3.13 on PATH;" \
		"use make PYTHON=/path/to/python" >&2; exit 1; }
	@$(PYTHON) -c '$(SUPPORTED_PYTHON)' || { echo "error: $(PYTHON) is Python" \
		"$$($(PYTHON) -c 'import sys; print(sys.version.split()[0])'); scaling_lab needs 3.11 to 3.13:" \
		"use make PYTHON=/path/to/python3.12" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	@if [ -n "$(TORCH_INDEX)" ]; then index="--index-url $(TORCH_INDEX)"; \
	elif $(PY) -m pip install --quiet --dry-run --no-deps --no-index '$(TORCH)' >/dev/null 2>&1 \
		|| command -v nvidia-smi >/dev/null; then index=""; \
	else index="--index-url $(TORCH_CPU_INDEX)"; fi; \
	echo "$(PY) -m pip install --quiet $$index '$(TORCH)'"; \
	$(PY) -m pip install --quiet $$index '$(TORCH)'
	$(PY) -m pip install --quiet -c constraints.txt -e .
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation $(DEEPSPEED)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -c 'from scaling_lab.deepspeed_setup import build_deepspeed_ops; build_deepspeed_ops()' >/dev/null
	touch $(STAMP)

demo: install
	$(PY) -m scaling_lab.study run studies/default.yaml
	$(PY) -m scaling_lab.analysis fit results/default

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: install
	$(PY) -m ruff check scaling_lab tests benchmarks

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not ray and not real"
