# Set-up and entry points. `make demo` and `make test` create the Python 3.12
# virtual environment on first use (JAX 0.11 needs Python >= 3.12).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON312 ?= $(shell command -v python3.12 >/dev/null 2>&1 && PYENV_VERSION=3.12.1 python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo python3.12)
PYTEST_ARGS ?=
# libtpu as `jax[tpu]==0.11.2` pins it, for the tests that compile for TPU chips on this host
# (tests/test_tpu_compile.py). Kept beside the environment, off its import path, so that CPU
# runs never probe for a TPU.
LIBTPU := libtpu==0.0.48.1

.PHONY: venv demo play test lint clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

demo: venv
	$(PY) -m crm_jax.main --config=configs/toy_demo.py --workdir=$${WORKDIR:-runs/demo}

# Play the world model in a browser (docs/play.md): prints the URL of a local server.
# PLAY_ARGS: e.g. "--port 0" or "--student runs/demo/tf_scm/export".
play: venv
	$(PY) -m crm_jax.play $(PLAY_ARGS)

$(VENV)/libtpu/.installed: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps --target $(VENV)/libtpu "$(LIBTPU)"
	touch $@

test: venv $(VENV)/libtpu/.installed
	$(PY) -m pytest -q -n 2 --dist worksteal tests $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
