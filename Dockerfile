# Image for index-images / serve-images. Build: docker compose build
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY retrieval retrieval
COPY indexer indexer
COPY api api
RUN pip install .
ENV RETRIEVAL_INDEX_DIR=/index
EXPOSE 8000
CMD ["serve-images", "--host", "0.0.0.0", "--port", "8000"]
