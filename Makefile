# kdfine: `make demo` runs the example pipeline, `make test` the test suite.
# Both create .venv on first use and install everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdfine-installed
# A pinned pair that pip serves from the local cache; pyproject.toml itself only asks torch>=2.4.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test groff chromium jq completions man clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/pipeline.sh

# One worker per core, each test file on one worker (its module fixtures run once).
test: $(STAMP) groff chromium jq
	$(BIN)/python -m pytest -n auto --dist loadfile

# tests/test_man.py renders the man pages with groff (Debian's groff-base, present on most systems).
groff:
	@command -v groff >/dev/null 2>&1 || { echo "installing groff-base for the man page tests" >&2; \
	  apt-get install -y -qq groff-base >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq groff-base; }; }

# tests/test_review.py drives the review page in a headless Chromium (Debian's chromium package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium for the review page tests" >&2; \
	  apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }; }

# tests/test_docs.py runs the guide's examples, some of which pipe --json into jq (Debian's jq).
jq:
	@command -v jq >/dev/null 2>&1 || { echo "installing jq for the guide's examples" >&2; \
	  apt-get install -y -qq jq >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq jq; }; }

completions: $(STAMP)
	$(BIN)/python scripts/gen_completions.py

man: $(STAMP)
	$(BIN)/python scripts/gen_man.py

clean-venv:
	rm -rf $(VENV)
