# Two commands a new user needs: `make demo` and `make test`. Both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: venv demo test clean

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
	$(VENV)/bin/python -m megatron_pn.demo

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) demo_out
