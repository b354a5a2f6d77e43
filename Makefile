# The two commands of the README (and the linter CI runs first). Each sets up .venv on its own first,
# with every extra: pip install -e ".[all,dev,weights]".
.PHONY: demo test lint setup

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/plca demo

lint: setup
	.venv/bin/python -m ruff check .

test: setup
	.venv/bin/python -m pytest
