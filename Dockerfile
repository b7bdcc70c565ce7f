# Image for index-images and serve-images. Build and run: see docs/deploy.md.
# Where no registry is reachable, docker/build-base-image.sh builds this base locally first.

# Stage 1: the dependency list, out of pyproject.toml. Copied into the image by content, so an edit
# to pyproject.toml that leaves the dependencies alone does not re-download torch (about 3 GB).
FROM python:3.11-slim-bookworm AS requirements
COPY pyproject.toml /tmp/
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /requirements.txt

FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RETRIEVAL_INDEX_DIR=/index \
    TORCH_HOME=/cache/torch

# An unprivileged user; /index and /cache/torch are volume mount points owned by it, so a fresh
# named volume starts writable for it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/app app \
 && mkdir -p /index /cache/torch \
 && chown app:app /index /cache/torch

WORKDIR /app

# Dependencies first: editing the source does not re-download torch.
COPY --from=requirements /requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# Then the project itself (no dependency resolution: they are all above).
COPY pyproject.toml README.md ./
COPY retrieval retrieval
COPY indexer indexer
COPY api api
COPY commands commands
RUN pip install --no-deps . \
 && rm -rf build *.egg-info

USER app
EXPOSE 8000
# /healthz answers 200 once the index is loaded; Python's urllib needs nothing extra in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["serve-images", "--host", "0.0.0.0", "--port", "8000"]
