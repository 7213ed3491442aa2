# One-command set-up: `make run` and `make test` create .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PACKAGES := src/koopman_sim src/koopman_policy src/koopman_distill src/koopman_control
export MUJOCO_GL ?= egl
export RMW_IMPLEMENTATION ?= rmw_fastrtps_cpp

.PHONY: setup run test lint bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt $(addsuffix /setup.py,$(PACKAGES))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps $(addprefix -e ,$(PACKAGES))
	@touch $@

run: setup
	$(VENV)/bin/koopman-control run

test: setup
	$(PY) -m pytest test

lint: setup
	$(VENV)/bin/ruff check src test launch

bench: setup
	$(VENV)/bin/koopman-distill bench --json bench/latency.json

clean-venv:
	rm -rf $(VENV)
