# The two commands of the README contract. Both set up .venv first (a no-op when current).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup:
	@bash scripts/setup.sh

run: setup
	@bash scripts/run-main.sh

test: setup
	@bash scripts/test.sh

clean:
	rm -rf $(VENV) .pytest_cache
