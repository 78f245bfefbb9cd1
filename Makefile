# Two commands on a fresh machine: `make demo` and `make test`; `make install` is their first step.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.rowcol-installed

.PHONY: install demo test clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "rowcol needs Python >= 3.11, found " + sys.version.split()[0]'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_PINS)
	$(PY) -m pip install -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/rowcol demo

test: install
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
