# Two commands a new user needs: `make demo` and `make test`. Both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast clean gpu-wheels

venv: $(STAMP)

# torch goes in first and pinned: the lock is passed as constraints so no dependency can
# replace it with a newer (multi-GB CUDA) build.
$(STAMP): pyproject.toml requirements/lock.txt
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c requirements/lock.txt -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/pn-experiment run configs/experiments/demo.yaml --out demo_out

# Two pytest workers (pytest-xdist), a test module each at a time (--dist loadscope: a module's
# fixtures are built once, the two-host cluster's tests stay in one worker), in collection order
# (--no-loadscope-reorder: tests/conftest.py puts the longest modules first). Most tests run
# single-threaded processes, so two workers fill a 2-core machine; more would oversubscribe the
# multi-process ones. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -ra --durations=12 -n $(TEST_WORKERS) --dist loadscope \
	--no-loadscope-reorder

test: $(STAMP)
	$(PYTEST) tests

# The fast tier: no training (config, error and bad-input cases, in-process model checks).
test-fast: $(STAMP)
	$(PYTEST) -m "not slow" tests

# Wheels a lent GPU machine needs (Python 3.12 with torch, no package registry); carry the folder
# and run benchmarks/gpu_check.sh there (benchmarks/README.md). torch itself is never fetched.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHON ?= 3.12
GPU_PLATFORM := --python-version $(GPU_PYTHON) --implementation cp --only-binary=:all: --no-deps \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# megatron-core and DeepSpeed's imports, pytest, and what a bare torch install lacks.
GPU_DEPS := numpy PyYAML packaging tqdm pytest pluggy iniconfig Pygments pytest-timeout \
	hjson py-cpuinfo psutil pydantic pydantic_core annotated-types typing-inspection msgpack einops ninja

gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PIP) download -q -d $(GPU_WHEELS) $(GPU_PLATFORM) -c requirements/lock.txt \
		megatron-core==0.16.1 $(GPU_DEPS)
	DS_BUILD_OPS=0 $(PIP) wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) deepspeed==0.19.8
	printf '%s\n' megatron-core deepspeed $(GPU_DEPS) > $(GPU_WHEELS)/requirements.txt
	@du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) demo_out $(GPU_WHEELS)
