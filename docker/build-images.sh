#!/usr/bin/env bash
# Build what docker-compose.yml runs: the base image where no registry has it (build-base-image.sh,
# cached by content), then `docker-compose build`. One build at a time on a machine: a second caller
# waits for the first (a lock), then finds its layers cached. CI starts this in the background while
# the rest of the test suite runs; tests/test_docker.py runs it again and so waits for that build.
set -euo pipefail
cd "$(dirname "$0")/.."
image=cnn-image-retrieval:latest     # docker-compose.yml's image name

exec 9>"${TMPDIR:-/tmp}/cnn-image-retrieval-docker-build.lock"
flock 9

bash docker/build-base-image.sh
before="$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)"
docker-compose build api
after="$(docker image inspect -f '{{.Id}}' "$image")"
# The replaced build, once no tag names it: don't pile up 6 GB images.
if [[ -n "$before" && "$before" != "$after" ]] \
   && [[ "$(docker image inspect -f '{{len .RepoTags}}' "$before" 2>/dev/null)" == 0 ]]; then
    docker image rm "$before" >/dev/null 2>&1 || true
fi
echo "$image: $after"
