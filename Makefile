# The two set-up commands: `make demo` and `make test` (see README.md).
# The venv is built from Debian's /usr/bin/python3 when present, so PostgreSQL's
# archive_command (running as the postgres user) can execute backupd from it.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
VENV := .venv
EXTRAS := test,postgres,mysql,mongodb
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)

.PHONY: demo test tools venv clean bench

venv: $(STAMP)

# editable_mode=compat: a plain path entry instead of an import hook, which would cost every
# backupd start (PostgreSQL runs one per WAL file) about 15 ms.
$(STAMP): pyproject.toml Makefile
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --config-settings editable_mode=compat -e '.[$(EXTRAS)]'
	$(VENV)/bin/python -m compileall -q backupd drivers storage   # as pip does for an installed package
	@rm -f $(VENV)/.installed-*
	@touch $@

tools:
	@bash scripts/install-tools.sh

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP) tools
	$(VENV)/bin/python -m mypy
	$(VENV)/bin/python -m pytest

bench: $(STAMP) tools
	$(VENV)/bin/python bench/pipeline.py

clean:
	rm -rf $(VENV) var .pytest_cache
