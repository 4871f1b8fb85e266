# syntax=docker/dockerfile:1
# vggserve on a GPU host: two images from one file, built from the repository root after the
# models are exported (python export/to_onnx.py writes model_repository/):
#
#   docker build --target triton   -t vggserve-triton   .
#   docker build --target frontend -t vggserve-frontend .
#
# docs/triton.md shows how to run them together (docker network or compose).

ARG TRITON_VERSION=24.10
ARG PYTHON_VERSION=3.11

# --- build: the vggserve wheel ------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vgg/ vgg/
COPY inference/ inference/
COPY server/ server/
COPY export/ export/
COPY clients/ clients/
COPY tritonmodels/ tritonmodels/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- triton: NVIDIA's Triton Inference Server, native ONNX Runtime backend, on the GPU ---------
# 24.10 is Triton 2.51, the version the local CPU twin (make triton) runs in the tests.
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3 AS triton
# The classify model (Python backend) runs tritonmodels.classify in Triton's stub, which uses
# the container's Python 3.10: the wheel goes in despite the package's requires-python (the
# code classify imports runs on 3.10), with only what that code imports. The ranges are
# pyproject.toml's (tests/test_dockerfile.py keeps them equal).
COPY --from=build /wheels /wheels
RUN python3 -m pip install --no-cache-dir --no-deps --ignore-requires-python /wheels/*.whl \
    && python3 -m pip install --no-cache-dir \
        "numpy>=1.26,<3" \
        "pillow>=10.3,<14" \
        "protobuf>=4.25,<7" \
        "tritonclient[grpc]>=2.50,<3" \
    && rm -rf /wheels
# The production configs and classify (export with `--target gpu` for two KIND_GPU instances,
# warm-up and a capped CUDA arena; a default export's KIND_AUTO instance lands on the GPU too). Mount another repository on /models to serve it instead:
# classify reads its sibling models' config.pbtxt and labels.txt from that folder.
COPY model_repository/ /models/
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/v2/health/ready"]
ENTRYPOINT ["tritonserver"]
CMD ["--model-repository=/models", "--strict-readiness=true", "--exit-on-error=true"]

# --- frontend: the HTTP front end, talking to Triton over gRPC ----------------------------------
FROM python:${PYTHON_VERSION}-slim AS frontend
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
# Only what serving imports: torch, torchvision, onnx and matplotlib are for training and export.
# The ranges are pyproject.toml's (tests/test_dockerfile.py keeps them equal).
RUN pip install --no-cache-dir --no-deps /wheels/*.whl \
    && pip install --no-cache-dir \
        "numpy>=1.26,<3" \
        "pillow>=10.3,<14" \
        "onnxruntime>=1.20,<2" \
        "protobuf>=4.25,<7" \
        "fastapi>=0.115,<1" \
        "fastapi-offline>=1.7,<2" \
        "uvicorn[standard]>=0.30,<1" \
        "python-multipart>=0.0.18" \
        "pydantic>=2.7,<3" \
        "prometheus-client>=0.20,<1" \
        "tritonclient[grpc]>=2.50,<3" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home vggserve
USER 10001
WORKDIR /home/vggserve
# Only Triton's address: labels, limits and serving scales are read from Triton, and each
# request is one call to its classify model. No repository is mounted here.
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "server"]
CMD ["--backend", "triton", "--triton-url", "triton:8001", "--host", "0.0.0.0", "--port", "8080"]
