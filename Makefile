# Set-up and test entry points. Every target builds or reuses the cached venv first
# (scripts/setup_env.sh: outside the clone, keyed by the dependency files).
SHELL := /bin/bash
PYTEST_ARGS ?=

DEMO ?= pipelines/country_qa.yaml
VISION_DEMO ?= pipelines/fashion_mnist.yaml
GPU_CHECK_OUT ?= gpu-check

.PHONY: demo demo-vision test test-fast test-gpu gpu-check setup lock

demo:  ## the embedded demo: a small Llama forgets country facts, HAMU vs baselines, on a local Ray (README, "The demo")
	@venv=$$(scripts/setup_env.sh) || exit 1; \
	"$$venv/bin/hamu-ray" run $(DEMO)

demo-vision:  ## the classifier demo: Fashion-MNIST, HAMU vs baselines (about 7 min on 2 cores, venv cached)
	@venv=$$(scripts/setup_env.sh) && scripts/ensure_fashion_mnist.sh || exit 1; \
	"$$venv/bin/hamu-ray" run $(VISION_DEMO)

test:  ## everything CI runs, integration tests included
	@venv=$$(scripts/setup_env.sh) || exit 1; \
	scripts/ensure_fashion_mnist.sh --optional; \
	"$$venv/bin/python" -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests, which is a failure" >&2; fi; \
	exit $$rc

test-fast:  ## skip the tests that start processes (gloo, Ray, DeepSpeed)
	@$(MAKE) --no-print-directory test PYTEST_ARGS='-m "not integration" $(PYTEST_ARGS)'

test-gpu:  ## only the CUDA checks (tests/test_gpu.py); they skip on a machine without a GPU
	@$(MAKE) --no-print-directory test PYTEST_ARGS='-m gpu $(PYTEST_ARGS)'

gpu-check:  ## on a CUDA machine, ≤ 8 min: test-gpu, bench on the ~1B Llama, peak memory vs plan; report in $(GPU_CHECK_OUT)/gpu-check.md
	@venv=$$(scripts/setup_env.sh) || exit 1; \
	"$$venv/bin/python" scripts/gpu_check.py "$(GPU_CHECK_OUT)"

setup:  ## build (or find) the venv and print its path
	@scripts/setup_env.sh

lock:  ## re-pin requirements/lock.txt from the current venv after editing requirements/base.txt
	@venv=$$(scripts/setup_env.sh) || exit 1; \
	{ sed -n '1,3p' requirements/lock.txt; \
	  "$$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|hamu-ray)=='; \
	} > requirements/lock.txt.new && mv requirements/lock.txt.new requirements/lock.txt
