# T-LoRA: environment, tests and local fixtures.
#
#   make venv           create .venv and install the requirements (re-runs only when they change)
#   make test           run the test suite offline (PYTEST_ARGS="-q tests -k name" to narrow it)
#   make fixtures       build the tiny random pipeline of FAMILY (sd, sdxl or flux; default sdxl) in
#                       outputs/tiny-FAMILY, e.g. make fixtures FAMILY=flux
#   make fixtures-small build the larger benchmark-sized one in outputs/small-FAMILY
#   make fixtures-all   build both sizes of every family
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
FAMILY ?= sdxl
FAMILIES := sd sdxl flux

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test fixtures fixtures-small fixtures-all demo clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

fixtures: outputs/tiny-$(FAMILY)/model_index.json

fixtures-small: outputs/small-$(FAMILY)/model_index.json

fixtures-all: $(foreach size,tiny small,$(foreach family,$(FAMILIES),outputs/$(size)-$(family)/model_index.json))

FIXTURE_SOURCES := scripts/make_tiny_pipeline.py scripts/tiny_tokenizers.py $(STAMP)

outputs/tiny-%/model_index.json: $(FIXTURE_SOURCES)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_pipeline.py outputs/tiny-$* --family $* --size tiny --overwrite

outputs/small-%/model_index.json: $(FIXTURE_SOURCES)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_pipeline.py outputs/small-$* --family $* --size small --overwrite

demo: venv
	$(PY) scripts/demo.py $(DEMO_ARGS)

clean:
	rm -rf outputs .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
