# metadiff developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
EXP ?= hyperldm_synthvqa_demo
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.DEFAULT_GOAL := help
.PHONY: help install demo train test test-fast test-slow test-demo bench gpu-check gpu-check-quick report sweep meta-vqa lint typecheck format clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml requirements/torch-cpu.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements/torch-cpu.txt
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with the CPU-capable torch pair and metadiff[dev]

demo: install ## set up and run the main embedded experiment end to end (EXP=...)
	$(PY) train.py experiment=$(EXP)

train: install ## run one experiment: make train EXP=clip_synthvqa ARGS="trainer.max_epochs=1"
	$(PY) train.py experiment=$(EXP) $(ARGS)

test: install ## the whole test suite in one run of 2 workers, the exact demo aside (what CI runs)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not demo" --durations=15 tests

test-fast: install ## the suite without the slow end-to-end checks (kill/resume, DDP/bf16 parity, sweeps, gpu-check-quick)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=15 tests

test-slow: install ## only the slow end-to-end checks
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "slow and not demo" --durations=15 tests

test-demo: install ## the exact `make demo` run checked end to end (~10 min; not in CI)
	$(PY) -m pytest -q -m demo tests

bench: install ## benchmarks -> bench/*.json
	$(PY) -m metadiff.bench --out bench

gpu-check: install ## the real-size models on generated data + projection of both real chains -> bench/gpu_check.{json,md}
	$(PY) -m metadiff.bench.gpu_check --out bench

gpu-check-quick: install ## gpu-check at tiny counts on the CPU (what CI runs, < 5 min on 2 cores)
	$(PY) -m metadiff.bench.gpu_check --quick --device cpu --out bench

report: install ## one page of every artifact's metrics and plots -> outputs/report/report.{md,html} (OUT=dir)
	$(PY) -m metadiff.report outputs $(if $(OUT),--out $(OUT))

sweep: install ## example Hydra multirun: make sweep ARGS="seed=1,2"
	$(PY) train.py -m experiment=$(EXP) $(or $(ARGS),seed=1,2)

meta-vqa: install ## build Meta-VQA task files from VQA v2: make meta-vqa VQA_DIR=/data/VQA [OUT=dir]
	$(PY) -m metadiff.data.meta_vqa build --vqa-dir $(VQA_DIR) --out $(or $(OUT),outputs/data/meta_vqa/built)

lint: install ## ruff lint and format check, then the type check (CI runs this first)
	$(VENV)/bin/ruff check src tests train.py
	$(VENV)/bin/ruff format --check src tests train.py
	$(MAKE) --no-print-directory typecheck

typecheck: install ## mypy over src/ and train.py ([tool.mypy] in pyproject.toml)
	$(VENV)/bin/mypy

format: install ## ruff format + import sort
	$(VENV)/bin/ruff check --fix src tests train.py
	$(VENV)/bin/ruff format src tests train.py

clean: ## remove outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache .mypy_cache bench/*.json bench/*.md
	find . -name __pycache__ -prune -exec rm -rf {} +
