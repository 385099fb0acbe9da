# Two commands for a fresh machine:
#   make demo   installs, runs the embedded default study, fits the law
#   make test   installs, runs the test suite (what .ci/run calls)
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test

install: $(STAMP)

# torch first (the local CPU wheel), then the package, then DeepSpeed built against that torch, and the op
# DeepSpeed would otherwise build in the first trial (its CPU comm op: about a minute)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	$(PY) -c 'from scaling_lab.train import build_deepspeed_ops; build_deepspeed_ops()' >/dev/null
	touch $(STAMP)

demo: install
	$(PY) -m scaling_lab.study run studies/default.yaml
	$(PY) -m scaling_lab.analysis fit results/default

test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=15
