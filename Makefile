# The two set-up commands: `make demo` and `make test` (see README.md).
# The venv is built from Debian's /usr/bin/python3 when present, so PostgreSQL's
# archive_command (running as the postgres user) can execute backupd from it.
PYTHON ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
VENV := .venv
EXTRAS := test,postgres,mysql,mongodb
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test tools venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

tools:
	@bash scripts/install-tools.sh

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP) tools
	$(VENV)/bin/python -m pytest

bench: $(STAMP) tools
	$(VENV)/bin/python bench/pipeline.py

clean:
	rm -rf $(VENV) var .pytest_cache
