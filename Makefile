# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The shared data folder beside the repo, unless FXQUANT_DATA is already set.
FXQUANT_DATA ?= $(abspath ../shared/data)
export FXQUANT_DATA
# torch==2.13.0 resolves to the local CPU wheel; constraints.txt stops any dependency from
# pulling a CUDA build.
PIP := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt

.PHONY: install demo test test-fast results clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test,viz,bench,deploy,gpu]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m fxquant.cli demo

# One torch thread per xdist worker: two workers on two cores, no oversubscription.
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile

test-fast: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

results: install
	for c in docs/results/*.toml; do $(PY) -m fxquant.cli table --config $$c --out docs/results.md || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache

# Headless Chromium for tests/test_report.py's browser test (the test installs it itself when
# it runs as root; this is the same step for a machine set up ahead of time).
.PHONY: browser-deps
browser-deps:
	test -x /usr/bin/chromium || (apt-get install -y --no-install-recommends chromium || \
		(apt-get update && apt-get install -y --no-install-recommends chromium))
