# Two commands on a fresh machine:  `make run`  and  `make test`.
# Each installs what it needs first: uv (pinned) into .tools/, then the locked
# dependencies (uv.lock) into .venv/.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
SYNCED := $(VENV)/.synced

.PHONY: run test lint install clean

run: $(SYNCED)
	$(VENV)/bin/luthien-control serve

test: $(SYNCED)
	scripts/ensure-postgres
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	LUTHIEN_REQUIRE_POSTGRES=1 $(VENV)/bin/pytest

lint: $(SYNCED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

install: $(SYNCED)

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv==$(UV_VERSION)"

$(SYNCED): uv.lock pyproject.toml | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

clean:
	rm -rf .tools $(VENV) .mypy_cache .ruff_cache .pytest_cache
