# The two commands of the README. Each sets up .venv on its own first.
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/plca demo

test: setup
	.venv/bin/python -m pytest
