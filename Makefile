# The developer interface. `make run` and `make test` work on a fresh clone (Python 3.11 + pip).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; override for a GPU host (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
PROTO_OUT := protos/llamadist_pb2.py

.PHONY: install protos run test test-grpc-hop test-all lint format bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed protos

$(PROTO_OUT): protos/llamadist.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/llamadist.proto

protos: $(PROTO_OUT)

run: install
	$(PY) -m client.quickstart

# -rfEs: the short summary names every failure and error and says why each skip skipped
# (`-rs` alone would drop the failures from it); LLAMADIST_REQUIRE makes chosen skips fail.
# A test that runs past faulthandler_timeout prints every thread's stack (pyproject.toml: 120 s;
# the slow pass, whose fuzz and soak tests run minutes by design, waits 600 s).
test: install
	$(PY) -m pytest -q -rfEs -m "not slow" tests
	$(PY) -m pytest -q -rfEs -m slow -o faulthandler_timeout=600 tests

# The contract suites with every step link on gRPC (ForwardStream), the hop socket's fallback
# (--hop grpc); `make test` runs them on the hop socket, the default.
test-grpc-hop: install
	LLAMADIST_HOP=grpc $(PY) -m pytest -q -rfEs tests/test_mesh_exactness.py tests/test_failover.py \
		tests/test_forwarding.py tests/test_reload.py tests/test_security.py \
		tests/test_security_stage_key.py tests/test_replicas.py tests/test_fuzz.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The mesh against transformers' generate (bench/mesh.py; flags: $(PY) -m bench.mesh --help).
bench: install
	$(PY) -m bench.mesh

# Soak (tests/soak.py): 32 concurrent sessions against a 2-stage mesh; CI runs 30 s (test_soak).
SOAK_SECONDS ?= 300
.PHONY: soak
soak: install
	$(PY) -m tests.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi

# Deployment (docker/, README "Deploy"): the image, compose on this host, the end-to-end tests.
IMAGE ?= llamadist:latest
BASE_IMAGE ?= llamadist-base:bookworm
COMPOSE := docker-compose -p llamadist -f docker/docker-compose.yml
MODEL_DIR = $$($(VENV)/bin/llamadist model fetch-default)

.PHONY: images compose-up compose-down compose-test netns-test

images: install
	docker/build-images.sh "$(PY)" "$(TORCH_SPEC)" "$(BASE_IMAGE)" "$(IMAGE)"

compose-up: images
	LLAMADIST_MODEL_DIR="$(MODEL_DIR)" LLAMADIST_IMAGE=$(IMAGE) $(COMPOSE) up -d
	$(PY) -c "from client import Client; Client('127.0.0.1:$${LLAMADIST_PORT:-50051}').wait_ready(300)"
	@echo "llamadist serving on 127.0.0.1:$${LLAMADIST_PORT:-50051} (make compose-down stops it)"

compose-down:
	LLAMADIST_MODEL_DIR=$${LLAMADIST_MODEL_DIR:-/unused} $(COMPOSE) down -v --remove-orphans

compose-test: images
	LLAMADIST_COMPOSE_TEST=1 LLAMADIST_IMAGE=$(IMAGE) $(PY) -m pytest -q -s -rs -m slow tests/test_compose.py

netns-test: install
	$(PY) -m pytest -q -s -rs -m slow tests/test_netns.py
