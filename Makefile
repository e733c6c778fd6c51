# Two entry points for a fresh machine: `make demo` and `make test`. Each builds .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch's CPU wheel lies on this machine's disk; pip finds it through find-links.
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install demo test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(PIP_FLAGS) -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/qwen15 pull qwen2.5-coder-0.5b-instruct
	$(BIN)/qwen15 generate --chat --temperature 0 --max-tokens 200 \
		--prompt "Write a Python function that checks whether a number is prime."

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
