# The two commands of the README (and the linter CI runs first). Each sets up .venv on its own first,
# with every extra: pip install -e ".[all,dev,weights]".
.PHONY: demo test lint setup

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/plca demo

lint: setup
	.venv/bin/python -m ruff check .

# two pytest-xdist workers (one torch thread each, tests/conftest.py): the suite's subprocess and signal
# tests spend much of their time waiting, so two workers finish in about 2/3 of one's time on 2 cores
test: setup
	.venv/bin/python -m pytest -n 2
