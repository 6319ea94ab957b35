PY ?= .venv/bin/python
export PYTHONDONTWRITEBYTECODE = 1

.PHONY: venv test lint
venv: .venv/.stamp
.venv/.stamp: pyproject.toml
	python3 -m venv .venv
	.venv/bin/pip install -q -e '.[dev,standalone]'
	touch $@

test: venv
	$(PY) -m pytest -q

lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy config producer workers
