# make search [STUDY=sts] [DATA=dir]   set up, then run a study on the embedded default model
# make test                            set up, then run the tests and ruff
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STUDY  ?= sts
DATA   ?= $(CURDIR)/datasets
export MINBERT_DATA := $(abspath $(DATA))

.PHONY: setup search test data dashboard
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,postgres]"
	touch $@

search: setup
	$(PY) run_search.py --study $(STUDY)

test: setup
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check .

# Downloads the CS224N files into ./datasets (or: python -m data.fetch --source DIR).
data: setup
	$(PY) -m data.fetch --download --dest $(DATA)

dashboard: setup
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 --port 8080 sqlite:///studies/optuna.db
