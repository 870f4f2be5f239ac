# Two commands on a fresh machine:  `make run`  and  `make test`.
# Each installs what it needs first: uv (pinned) into .tools/, then the locked
# dependencies (uv.lock) into .venv/.
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
VENV := .venv
SYNCED := $(VENV)/.synced
# The coding-agent CLIs that tests/agents drives (npm, pinned by package-lock.json).
AGENTS := tests/agents/node_modules/.installed

.PHONY: run test soak lint install clean

run: $(SYNCED)
	$(VENV)/bin/luthien-control serve

test: $(SYNCED) $(AGENTS)
	scripts/ensure-postgres
	scripts/ensure-chromium
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	# Three pytest-xdist workers on two cores (the suite waits on servers, sockets and
	# timeouts); a module runs whole on one worker (tests/conftest.py), the slowest first.
	LUTHIEN_REQUIRE_POSTGRES=1 LUTHIEN_REQUIRE_AGENTS=1 LUTHIEN_REQUIRE_BROWSER=1 \
	  $(VENV)/bin/pytest -n 3 --dist loadgroup

# The hardening suite (tests/hardening, also part of `make test`) at soak scale: 10,000
# fuzzed requests and policy files, ten rounds of 1,000 streams, longer outages
# (docs/operations.md#hardening-and-the-soak). LUTHIEN_SOAK_SEED=N changes the fuzzers' seed.
soak: $(SYNCED)
	scripts/ensure-postgres
	LUTHIEN_SOAK=1 LUTHIEN_REQUIRE_POSTGRES=1 $(VENV)/bin/pytest -p no:cacheprovider -q \
	  --timeout 3600 tests/hardening

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

$(AGENTS): tests/agents/package-lock.json tests/agents/package.json
	@command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || { \
	  echo "make: node and npm not found: tests/agents needs Node.js 20+ with npm" \
	    "to install the Claude Code and Codex CLIs it drives" >&2; exit 1; }
	npm ci --prefix tests/agents --no-audit --no-fund
	touch $@

clean:
	rm -rf .tools $(VENV) .mypy_cache .ruff_cache .pytest_cache tests/agents/node_modules
