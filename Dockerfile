# The dendro image: the API (`dendro serve`) and the GPU workers (`dendro worker`) run from it.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Metadata first, then the packages: `pip install .` also pulls torch, whose Linux wheels
# carry CUDA, so the same image serves the API and the GPU workers.
COPY pyproject.toml README.md ./
COPY core ./core
COPY studies ./studies
COPY service ./service
RUN pip install .

RUN useradd --create-home --uid 1000 dendro && mkdir /data && chown dendro /data
USER dendro
# Datasets (e.g. Fashion-MNIST's IDX files) and exports live here.
ENV DENDRO_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
CMD ["dendro", "serve", "--host", "0.0.0.0", "--port", "8000"]
