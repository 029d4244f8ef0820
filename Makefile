# Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
# the oldest dependency versions pyproject.toml allows (tests/oldest_versions.txt)
OLDEST_VENV ?= .venv-oldest
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data/flower_photos
ARCH ?= resnet50
TRAIN_ARGS ?=
# pytest processes; each test module runs whole in one of them (its fixtures are built once)
TEST_WORKERS ?= 2
PYTEST_OPTS := -q -n $(TEST_WORKERS) --dist loadscope
PYTEST_FAST := -m "not slow" $(PYTEST_OPTS)
# the inner loop: also leaves out the tests that launch scripts or Python processes
PYTEST_INNER := -m "not slow and not launches" $(PYTEST_OPTS)

.PHONY: venv train train-offline test test-fast test-all test-oldest lint format clean

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

# Tests that need the real flower photos run when RESNET_JAX_FLOWERS names them (.ci/run sets it).
test: lint
	$(PY) -m pytest $(PYTEST_FAST)

test-fast: lint
	$(PY) -m pytest $(PYTEST_INNER)

test-all: lint
	$(PY) -m pytest $(PYTEST_OPTS)

# made afresh when the requirements change: pip would keep packages a newer resolution replaces
$(OLDEST_VENV)/.installed: pyproject.toml tests/oldest_versions.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e '.[test]' -c tests/oldest_versions.txt
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -m pytest $(PYTEST_FAST)

format: venv
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) $(OLDEST_VENV) .pytest_cache
