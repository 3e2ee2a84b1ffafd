# Two commands for a fresh machine: `make demo` and `make test`. Each creates .venv and installs
# what it needs on first use (pip only).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# pip byte-compiles every installed file on one core (100 of the test install's 160 s on 2 cores);
# compileall does the same work on every core. A file it cannot compile (torch ships Python 3.12
# test syntax) is skipped, as pip skips it; Python compiles it if it is ever imported.
PYC = $(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --no-compile -e .
	$(PYC)
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install -q --no-compile -e '.[test]'
	$(PYC)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/python -m lgrpo_jax.demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV)
