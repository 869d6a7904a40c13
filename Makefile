# From a fresh clone (Python 3.11+ and make):
#   make report      generate reports for the default topics with the offline model (Python only)
#   make test-fast   the unit tests, under a minute: no subprocess, kernel, browser or benchmark
#   make test        the whole suite; installs Chromium, Java and fonts with apt if missing
#   make lint        ruff
#   make app         the report explorer as a web app on http://127.0.0.1:8866/ (APP_PORT=... for another port)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APP_PORT ?= 8866
TOPICS ?= "Quantum computing" "Why cats purr" "Remote work and small businesses"

.PHONY: install report app test test-fast lint system-deps bench notebooks lab clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; run: make PYTHON=python3.12 ...")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

report: install
	$(PY) pipeline.py $(TOPICS) --max-iterations 4

# Flyte's local serving of pipeline.app_env (Voila on apps/explorer.ipynb), on loopback only. exec: serve.py
# replaces the recipe's shell, so `kill <make's pid>` reaches it (make passes SIGTERM on to its child, and a
# shell in between would die without passing it on, leaving the app running).
app: install
	APP_PORT=$(APP_PORT) exec $(PY) apps/serve.py

test: install system-deps
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

# The browser tests need Chromium and fonts, the HTML checker Java: tools/system_deps.sh gets them.
system-deps:
	@bash tools/system_deps.sh

# Writes benchmarks/results.{json,md,png} and prints the table (a few minutes on 2 cores).
bench: install
	$(PY) benchmarks/bench.py

# Maintainers: after changing pipeline.py or a notebook, restart-and-run-all every notebook
# (offline model, fresh Flyte cache) and regenerate the navigation links and the index.
notebooks: install
	$(PY) tools/pipeline_diagram.py --write
	$(PY) tools/notebook_nav.py
	$(PY) tools/execute_notebooks.py

# As root (many containers) Jupyter refuses to start without --allow-root; it is passed only then.
lab: install
	$(VENV)/bin/jupyter lab $(if $(filter 0,$(shell id -u)),--allow-root) notebooks/00_setup.ipynb

clean:
	rm -rf reports build .pytest_cache
