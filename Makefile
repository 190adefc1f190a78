# `make serve` and `make test` build the environment they need first: .venv from requirements-dev.lock
# (the service's own pins, requirements.lock, which the Bento installs, plus test and benchmark tools).
PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
HOST ?= 127.0.0.1
BIN := $(VENV)/bin

.PHONY: venv serve lint test tiny bento bento-tensorrt device-wheels clean configuration-docs redis-server

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock requirements-dev.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements-dev.lock
	touch $@

serve: venv
	$(BIN)/bentoml serve service:FluxInpainting --host $(HOST) --port $(PORT)

# The Triton tier (runners/worker/triton_server.py) has its own environment: PyTriton needs numpy < 2.
TRITON_VENV ?= .venv-triton
.PHONY: venv-triton serve-triton

venv-triton: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed: requirements-triton.lock
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/pip install --quiet -r requirements-triton.lock
	touch $@

# Triton with the model on :8000 (KServe v2 HTTP), :8001 (gRPC), :8002 (metrics); the front then runs
# against it with: FLUX_EXECUTOR=triton FLUX_TRITON_URL=http://127.0.0.1:8000 make serve
serve-triton: venv-triton
	FLUX_TRITON_ADDRESS=$(HOST) $(TRITON_VENV)/bin/python -m runners.worker.triton_server

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The playground's browser tests (tests/test_playground.py) drive Debian's Chromium and its driver,
# installed here when missing (as root); the JavaScript client tests run @fal-ai/client from
# tests/js, installed from its package-lock.json (npm's cache makes later installs work offline).
.PHONY: browser js-client
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }

js-client: tests/js/node_modules/.package-lock.json

tests/js/node_modules/.package-lock.json: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --prefer-offline --no-audit --no-fund
	touch $@


# The fleet tests (tests/test_redis_queue.py, tests/test_fleet.py) run a real redis-server, and the
# failover test a real redis-sentinel (Debian packages it apart).
redis-server:
	@command -v redis-server >/dev/null && command -v redis-sentinel >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq redis-server redis-sentinel)

# The test files run on TEST_WORKERS processes (pytest-xdist), a file's tests together in one of them
# (tests/conftest.py groups them by file); conftest also gives each process one OpenMP thread.
TEST_WORKERS ?= 2
test: venv venv-triton lint browser js-client redis-server
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Regenerate docs/configuration.md from the settings' docstrings (tests/test_configuration_docs.py checks it).
configuration-docs: venv
	$(BIN)/python docs/write_configuration.py

# Write the tiny random-weight model to a folder: make tiny DIR=/tmp/tiny-flux
tiny: venv
	$(BIN)/python -m runners.pipeline.tiny $(or $(DIR),tiny-flux)

# Pack the service into a Bento (bentofile.yaml); no network or container engine needed.
# `bentoml containerize flux_inpaint:latest` then builds the image where a container engine runs.
bento: venv
	HF_HUB_OFFLINE=1 $(BIN)/bentoml build

# The same with TensorRT added to the image (deploy/bentofile.tensorrt.yaml).
bento-tensorrt: venv
	HF_HUB_OFFLINE=1 $(BIN)/bentoml build -f deploy/bentofile.tensorrt.yaml .

# The wheels the GPU device machine's image lacks (benchmarks/device/wheels.txt), for its Python 3.12
# on manylinux x86_64, into the ignored .whl/ that the device run carries (docs/benchmarks.md,
# "Performance"); the check then holds them to the pins, the image and the 64 MiB the tool sends.
DEVICE_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
device-wheels: venv
	rm -rf .whl
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(DEVICE_PLATFORMS)) -d .whl -r benchmarks/device/wheels.txt
	$(BIN)/python -m benchmarks.device.wheels .whl

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache tests/js/node_modules
