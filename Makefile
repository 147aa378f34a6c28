# The two commands that work on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-vllm lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch from the pinned release; an unpinned torch would pull a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[client,test]' ruff
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/eplbd demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# vLLM contract + integration tests, in their own venv (vLLM 0.33 on CPU torch, no CUDA
# dependencies). Kept outside the clone so CI runs on fresh clones reuse it.
VLLM_VENV ?= $(HOME)/.cache/eplbd/venv-vllm
test-vllm:
	mkdir -p $(dir $(VLLM_VENV))
	EPLBD_VLLM_VENV=$(VLLM_VENV) bash clients/vllm/setup_test_env.sh
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info
