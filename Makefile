# Two commands from a fresh clone (only Python 3.11+ needed):
#   make report   generate reports for the default topics with the offline model
#   make test     run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TOPICS ?= "Quantum computing" "Why cats purr" "Remote work and small businesses"

.PHONY: install report test bench notebooks lab clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; run: make PYTHON=python3.12 ...")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

report: install
	$(PY) pipeline.py $(TOPICS) --max-iterations 4

test: install
	$(PY) -m pytest

# Writes benchmarks/results.{json,md,png} and prints the table (a few minutes on 2 cores).
bench: install
	$(PY) benchmarks/bench.py

# Maintainers: after changing pipeline.py or a notebook, restart-and-run-all every notebook
# (offline model, fresh Flyte cache) and regenerate the navigation links and the index.
notebooks: install
	$(PY) tools/notebook_nav.py
	$(PY) tools/execute_notebooks.py

lab: install
	$(VENV)/bin/jupyter lab notebooks/00_setup.ipynb

clean:
	rm -rf reports build .pytest_cache
