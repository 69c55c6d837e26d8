# The few commands people run. Each creates .venv and installs the package when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test test-all lint format bench-ppl clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0 (a plain `torch` requirement would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,onnx,triton]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m qcompile demo

# Fast synthetic tests plus a small real-model subset (`real` marker); `slow` ones are excluded.
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider -n auto --dist loadfile

# Everything, the slow real-model runs included.
test-all: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile

lint: $(STAMP)
	$(PY) -m ruff check qcompile passes backends tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format qcompile passes backends tests benchmarks

bench-ppl: $(STAMP)
	$(PY) benchmarks/ppl.py

clean:
	rm -rf $(VENV) build *.egg-info
