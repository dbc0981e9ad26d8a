# kdfine: `make demo` runs the example pipeline, `make test` the test suite.
# Both create .venv on first use and install everything they need.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdfine-installed
# A pinned pair that pip serves from the local cache; pyproject.toml itself only asks torch>=2.4.
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test system completions man clean-venv

# The venv without pip, then a current pip installed into it by the interpreter's own (ensurepip's
# bundled pip, then an upgrade, took 12 s); where that pip is too old for --python, ensurepip.
$(BIN)/python:
	$(PYTHON) -m venv --without-pip $(VENV)
	$(PYTHON) -m pip --python $(BIN)/python install --quiet --upgrade pip 2>/dev/null || \
	  { $(BIN)/python -m ensurepip --default-pip >/dev/null && $(BIN)/python -m pip install --quiet --upgrade pip; }

# One resolve, then the wheels unpacked by two pip processes at once (scripts/install.py): torch's
# CUDA libraries are most of the install's time, and one pip uses one core.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python scripts/install.py $(TORCH_PIN) -e '.[test,plot]'
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/pipeline.sh

# The Python installs and the system packages at the same time (each is mostly one core waiting on
# downloads and unpacking), then one worker per core, each test file on one worker (its module
# fixtures run once).
test:
	@$(MAKE) --no-print-directory -j2 $(STAMP) system
	$(BIN)/python -m pytest -n auto --dist loadfile

# Debian packages the tests need, installed with apt-get when missing (one call, so one lock):
# groff-base renders the man pages (tests/test_man.py), chromium drives the review page
# (tests/test_review.py), jq reads --json in some of the guide's examples (tests/test_docs.py).
SYSTEM_TOOLS := groff:groff-base chromium:chromium jq:jq
system:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $${t%%:*} >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing for the tests" >&2; \
	  apt-get install -y -qq $$missing >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; }; fi

completions: $(STAMP)
	$(BIN)/python scripts/gen_completions.py

man: $(STAMP)
	$(BIN)/python scripts/gen_man.py

clean-venv:
	rm -rf $(VENV)
