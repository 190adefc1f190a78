# `make serve` and `make test` build the environment they need first: .venv from requirements-dev.lock
# (the service's own pins, requirements.lock, which the Bento installs, plus test and benchmark tools).
PYTHON ?= python3
VENV ?= .venv
PORT ?= 3000
HOST ?= 127.0.0.1
BIN := $(VENV)/bin

.PHONY: venv serve lint test tiny bento bento-tensorrt clean redis-server

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

# The fleet tests (tests/test_redis_queue.py, tests/test_fleet.py) run a real redis-server.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)

test: venv venv-triton lint redis-server
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

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

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache
