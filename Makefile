# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/flower_photos
ARCH ?= resnet50
TRAIN_ARGS ?=
# pytest processes; each test module runs whole in one of them (its fixtures are built once)
TEST_WORKERS ?= 2

.PHONY: venv train train-offline test test-all lint format clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) scripts/train.py --arch $(ARCH) $(TRAIN_ARGS)

train-offline: venv
	$(PY) scripts/train.py --arch $(ARCH) --data-dir $(DATA_DIR) $(TRAIN_ARGS)

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadscope

test-all: lint
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
