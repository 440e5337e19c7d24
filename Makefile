# Two commands: `make demo` and `make test`. Both create .venv and install the project when needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format clean serve

install: $(STAMP)

# torch is installed first and alone, pinned: an unpinned torch pulls multi-GB CUDA builds, and
# 2.13.0 (CPU) lies on the development machines' local wheel path.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $$($(BIN)/python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['tool']['mardini']['no-deps'])")
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mardini demo

# pytest exits 5 when it collected no tests: that must fail, not pass quietly.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache out

# A local Prefect server (UI on http://127.0.0.1:4200) serving the local deployments (the UI is
# told its API's port: by default it calls 4200 whatever port the server has); in another
# shell: PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run train-curriculum/local
PREFECT_PORT ?= 4200
serve: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT) & server=$$!; \
	trap "kill $$server" EXIT INT TERM; \
	until $(BIN)/python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$(PREFECT_PORT)/api/health')" 2>/dev/null; do sleep 1; done; \
	PREFECT_API_URL=http://127.0.0.1:$(PREFECT_PORT)/api $(BIN)/python -m pipelines.serve
