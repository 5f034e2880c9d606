# Two commands do everything:  `make book`  and  `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= default
STAMP := $(VENV)/.installed-stamp
# pip on these machines prints one harmless line per package about missing local index folders; hide those.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: book test env bench faults clean clean-results help

help:
	@echo "make book  [PROFILE=default]  create .venv, run the notebooks (papermill), build book/_build/html"
	@echo "make test                     create/update .venv and run the whole test suite"
	@echo "make bench                    print the benchmarks (tracing / editing speed, stage times)"
	@echo "make faults                   kill the smoke book with SIGKILL in every stage, re-run, compare (~15 min)"

env: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@echo "==> creating the virtual environment $(VENV) (if missing)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "==> installing the project and its dependencies (torch pinned by constraints.txt)"
	@$(PY) -m pip install --quiet --upgrade pip 2>&1 | $(QUIET_PIP)
	@$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,scale]' 2>&1 | $(QUIET_PIP)
	@touch $(STAMP)

book: $(STAMP)
	@echo "==> running the notebooks of profile '$(PROFILE)' in order, then building the book"
	@$(PY) -m helpers book --profile $(PROFILE)

test: $(STAMP)
	@echo "==> running the test suite"
	$(PY) -m pytest

bench: $(STAMP)
	@echo "==> tracing speed: fast path vs one site at a time (default world model)"
	OMP_NUM_THREADS=1 $(PY) benchmarks/tracing.py --facts 16 --windows 1,3,5,10
	@echo "==> editing speed: batched vs one fact at a time"
	OMP_NUM_THREADS=1 $(PY) benchmarks/editing.py --facts 16 --layers 2,5 --problems ei,ff
	@echo "==> editing quality bar (ROME/MEMIT/FT on Error Injection)"
	OMP_NUM_THREADS=1 $(PY) benchmarks/edit_quality.py --facts 50 --layers 0,2,4,6 || true
	@echo "==> real model: tracing speed on SmolLM2-135M (fast path vs one site at a time, 8 known facts, window 10)"
	$(PY) benchmarks/tracing.py --model smollm2-135m --data known --facts 8 --windows 10 --repeats 1 --threads 2
	@echo "==> real model: editing speed on SmolLM2-135M against the matrix-product lower bound (EI and FF, layers 6 and 18)"
	$(PY) benchmarks/editing.py --model smollm2-135m --data known --corpus wikitext --n-tokens 100000 --no-loop --facts 2 --layers 6,18 --problems ei,ff --threads 2 --chunk 2
	@echo "==> real model: editing quality bar on SmolLM2-135M (50 known facts, Error Injection)"
	$(PY) benchmarks/edit_quality.py --model smollm2-135m --data known --corpus wikitext --n-tokens 100000 --facts 50 --layers 3,6,12,21 --threads 2 || true
	@echo "==> scale-out: the same editing cells in-process, on 1 Ray worker and on 2 one-thread workers (SmolLM2)"
	$(PY) benchmarks/scale.py --profile smollm2 --facts 4 --layers 6,12 --methods ft1,rome || true
	@echo "==> per-stage times of the last run of each profile"
	@for f in results/*/timings.json; do echo "$$f"; $(PY) -c "import json,sys; [print(f'  {r[\"stage\"]:40s} {r[\"status\"]:8s} {r[\"seconds\"]:8.1f} s') for r in json.load(open(sys.argv[1]))]" $$f; done

faults: $(STAMP)
	$(PY) benchmarks/faults.py --profile smoke

clean-results:
	rm -rf results book/executed book/_build

clean: clean-results
	rm -rf $(VENV) .cache
