# Itera-Lite's HTTP server on CPU (python -m serve). Build from the repository root:
#   docker build -t itera-lite-serve .
#   docker run -p 127.0.0.1:8000:8000 -v "$PWD/checkpoints:/app/checkpoints:ro" itera-lite-serve
# The model is not baked in: mount a folder at /app/checkpoints (the bundled model is
# /app/checkpoints/itera-lite-tinystories), or pass --model with another folder or a Hub id.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HOME=/tmp/huggingface
WORKDIR /app

# torch first, from PyTorch's CPU-only index: the default wheel would bring several GB of CUDA libraries.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY modeling_itera/ modeling_itera/
RUN pip install ".[serve]"
COPY serve/ serve/

RUN useradd --create-home itera
USER itera
EXPOSE 8000
CMD ["python", "-m", "serve", "--host", "0.0.0.0", "--port", "8000"]
