# Two commands do all set-up on a fresh machine:
#   make demo   - install, then replay the shipped agent on a built-in scenario it was never trained
#                 on (one episode, no search) and print the before/after table
#   make test   - install, then run the test suite
# torch is installed first, pinned to the CPU build on this machine's disk (a looser pin can pull
# a multi-GB CUDA build).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test benchmark clean

$(BIN)/rltune: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/rltune

install: $(BIN)/rltune

demo: install
	$(BIN)/rltune replay ppo-v0 --scenario synthetic-10class --budget 16x

test: install
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
