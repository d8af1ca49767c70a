# T-LoRA for SD-XL: environment, tests and local fixtures.
#
#   make venv           create .venv and install the requirements (re-runs only when they change)
#   make test           run the test suite offline (PYTEST_ARGS="-q tests -k name" to narrow it)
#   make fixtures       build the tiny random SD-XL pipeline in outputs/tiny-sdxl
#   make fixtures-small build the larger benchmark-sized one in outputs/small-sdxl
#   make demo           run scripts/demo.py (DEMO_ARGS are passed on)
#   make clean          remove outputs/ and caches (keeps .venv); make distclean also removes .venv
#
# torch is installed on its own, before the other requirements, so that the
# build chosen here is the one used. The default pins the CPU build this
# project is tested with (a plain "torch" requirement can pull a multi-GB CUDA
# build). On a GPU machine pick a CUDA build instead, e.g.
#   make venv TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or TORCH_SPEC=torch for the default build from PyPI.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -q tests
DEMO_ARGS ?=

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test fixtures fixtures-small demo clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

fixtures: outputs/tiny-sdxl/model_index.json

fixtures-small: outputs/small-sdxl/model_index.json

outputs/tiny-sdxl/model_index.json: scripts/make_tiny_sdxl.py $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_sdxl.py outputs/tiny-sdxl --size tiny --overwrite

outputs/small-sdxl/model_index.json: scripts/make_tiny_sdxl.py $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_sdxl.py outputs/small-sdxl --size small --overwrite

demo: venv
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf outputs .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
