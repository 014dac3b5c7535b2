# The two commands a new user needs: `make quickstart` and `make test`.
# Both create .venv on first use and install modjax (editable) with what it needs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
WORKDIR ?= workdir/quickstart
LINT_PATHS := modjax tests experiments benchmarks launch

.PHONY: quickstart test lint data venv clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# Debian data packages: the fortunes corpus and Fashion-MNIST. Installed when missing
# and when we may (root with apt-get); otherwise the loaders say what to install.
data:
	@bash launch/install_data.sh

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)

test: lint data
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

quickstart: $(STAMP) data
	$(BIN)/python -m modjax.train --config experiments/moe_char_lm.py:tiny --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) workdir .pytest_cache .ruff_cache
