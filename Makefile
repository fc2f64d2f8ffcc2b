# Two commands on a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint docs bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the package metadata changes.
$(VENV)/.installed-server: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.installed-docs: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $@

$(VENV)/.installed-bench: setup.cfg pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

demo: $(VENV)/.installed-server
	$(BIN)/actorbus demo

test: lint docs
	$(BIN)/python -m pytest

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any warning,
# a broken link or anchor among them. The API reference reads the source (docs/hooks.py).
# NO_MKDOCS_2_WARNING quiets the theme's notice about MkDocs 2, which is no warning of ours.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The library's packages (and the benchmark) through ruff, and through mypy.
# mypy finds a package in a folder of its name, and setup.cfg maps the top-level
# folders into the actorbus namespace: it reads a tree of links laid out as installed.
LIBRARY := actorbus actors bridge supervision
TYPECHECK := $(VENV)/typecheck
lint: $(VENV)/.installed-test
	$(BIN)/ruff check $(LIBRARY) benchmarks examples
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/actorbus
	ln -s $(CURDIR)/actorbus/*.py $(CURDIR)/actorbus/py.typed $(TYPECHECK)/actorbus/
	for package in actors bridge supervision benchmarks; do ln -s $(CURDIR)/$$package $(TYPECHECK)/actorbus/$$package; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p actorbus

# The throughput and latency table, then what durable aggregates' snapshots cost.
bench: $(VENV)/.installed-bench
	$(BIN)/actorbus bench
	$(BIN)/actorbus bench --snapshots 3

# Not part of `make test`: ten minutes by default. Options go in SOAK, e.g.
# make soak SOAK="--messages 10000000 --keys 10000"; the report also goes to SOAK_JSON.
SOAK ?=
SOAK_JSON ?= soak-report.json
soak: $(VENV)/.installed-server
	$(BIN)/actorbus soak --json $(SOAK_JSON) $(SOAK)

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache soak-report.json
