# T-LoRA: environment, tests and local fixtures.
#
#   make venv           create .venv and install the requirements (re-runs only when they change)
#   make test           run the test suite offline (PYTEST_ARGS="-q tests -k name" to narrow it)
#   make test-fast      the same without the end-to-end training runs (tests marked slow)
#   make quality        lint and format check (ruff, settings in pyproject.toml; installs the pinned ruff if the
#                       venv lacks it), then the repeated code the `duplicates` command finds, where it is installed
#   make fixtures       build the tiny random pipeline of FAMILY (sd, sdxl or flux; default sdxl) in
#                       outputs/tiny-FAMILY, e.g. make fixtures FAMILY=flux
#   make fixtures-small build the larger benchmark-sized one in outputs/small-FAMILY
#   make fixtures-all   build both sizes of every family
#   make demo           run scripts/demo.py on the shipped toy base model (DEMO_ARGS are passed on);
#                       make demo FAMILY=flux: the same with train_tlora_flux.py on a tiny random FLUX.1 model
#   make toy-base       train the toy base model and the toy CLIP from scratch into outputs/ (resumable;
#                       about 30 minutes on 2 cores) and measure what the base model draws
#   make toy-experiment the paper's Table 1 in miniature on the toy base (about 20 minutes on 2 cores;
#                       TOY_EXPERIMENT_ARGS are passed on)
#   make gpu-wheels     download the diffusers and bitsandbytes wheels an offline GPU machine lacks into .whl/
#                       (for GPU_PYTHON_VERSION, default 3.12, Linux x86_64; needs network access)
#   make gpu-check      on the GPU machine: scripts/gpu_check.py with its own Python (GPU_PYTHON, default python3),
#                       installing the wheels from .whl/ if needed; results in bench/ (GPU_CHECK_ARGS passed on)
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
GPU_PYTHON ?= python3
GPU_PYTHON_VERSION ?= 3.12
GPU_CHECK_ARGS ?=
WHEELS := .whl
WHEELS_LIMIT_MB := 60
# The toy models the demo and the experiment use: the shipped ones, or TOY_MODELS=outputs after make toy-base.
TOY_MODELS ?= models
TOY_EXPERIMENT_ARGS ?=

PY := $(VENV)/bin/python
RUFF_VERSION := $(shell sed -n 's/^ruff==//p' requirements-dev.txt)
# A lister of repeated code; its absence only skips that part of `make quality`.
DUPLICATES ?= duplicates
DUPLICATES_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast quality fixtures fixtures-small fixtures-all demo toy-base toy-experiment gpu-wheels gpu-check \
	clean distclean

venv: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -r requirements-dev.txt
	touch $@

test: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Only ruff is installed here, not the whole venv: the lint needs nothing else.
quality: | $(PY)
	@$(VENV)/bin/ruff --version 2>/dev/null | grep -qx "ruff $(RUFF_VERSION)" || \
		$(PY) -m pip install "ruff==$(RUFF_VERSION)"
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if command -v $(DUPLICATES) >/dev/null 2>&1; then \
		echo "$(DUPLICATES) $(DUPLICATES_ARGS)"; $(DUPLICATES) $(DUPLICATES_ARGS); \
	else \
		echo "$(DUPLICATES) is not installed: skipping the check for repeated code"; \
	fi

fixtures: outputs/tiny-$(FAMILY)/model_index.json

fixtures-small: outputs/small-$(FAMILY)/model_index.json

fixtures-all: $(foreach size,tiny small,$(foreach family,$(FAMILIES),outputs/$(size)-$(family)/model_index.json))

FIXTURE_SOURCES := scripts/make_tiny_pipeline.py scripts/tiny_tokenizers.py $(STAMP)

outputs/tiny-%/model_index.json: $(FIXTURE_SOURCES)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_pipeline.py outputs/tiny-$* --family $* --size tiny --overwrite

outputs/small-%/model_index.json: $(FIXTURE_SOURCES)
	HF_HUB_OFFLINE=1 $(PY) scripts/make_tiny_pipeline.py outputs/small-$* --family $* --size small --overwrite

demo: venv
	$(PY) scripts/demo.py --family $(FAMILY) $(if $(filter sdxl,$(FAMILY)),--base_model $(TOY_MODELS)/toy-sdxl) \
		$(DEMO_ARGS)

# The toy CLIP trains alongside the base model (one core each); its log goes to outputs/toy-clip.log.
toy-base: venv
	mkdir -p outputs
	HF_HUB_OFFLINE=1 $(PY) scripts/train_toy_clip.py outputs/toy-clip > outputs/toy-clip.log 2>&1 & clip=$$!; \
	HF_HUB_OFFLINE=1 $(PY) scripts/train_toy_base.py outputs/toy-sdxl || { kill $$clip; exit 1; }; \
	wait $$clip || { echo "toy CLIP training failed: see outputs/toy-clip.log"; exit 1; }
	HF_HUB_OFFLINE=1 $(PY) scripts/measure_toy_base.py --model outputs/toy-sdxl --clip_model outputs/toy-clip \
		--output_dir outputs/toy-base-check

toy-experiment: venv
	HF_HUB_OFFLINE=1 $(PY) scripts/toy_experiment.py --base_model $(TOY_MODELS)/toy-sdxl \
		--clip_model $(TOY_MODELS)/toy-clip --output_dir outputs/toy-experiment $(TOY_EXPERIMENT_ARGS)

# The versions this checkout is tested with, as wheels for the GPU machine's Python (manylinux: bitsandbytes ships
# one wheel with its CUDA libraries for every CUDA version).
gpu-wheels: venv
	$(PY) -m pip download --no-deps --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON_VERSION) \
		--platform manylinux_2_24_x86_64 --dest $(WHEELS) \
		"diffusers==$$($(PY) -c 'import diffusers; print(diffusers.__version__)')" \
		"bitsandbytes==$$($(PY) -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')"
	@size=$$(du -sm $(WHEELS) | cut -f1); echo "$(WHEELS): $$size MB"; \
		test $$size -le $(WHEELS_LIMIT_MB) || { echo "$(WHEELS) exceeds $(WHEELS_LIMIT_MB) MB"; exit 1; }

gpu-check:
	HF_HUB_OFFLINE=1 $(GPU_PYTHON) scripts/gpu_check.py --wheels $(WHEELS) $(GPU_CHECK_ARGS)

clean:
	rm -rf outputs .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
