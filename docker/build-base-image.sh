#!/usr/bin/env bash
# Build the Dockerfile's base image (python:3.11-slim-bookworm) locally from Debian packages.
#
# Only needed where no image registry is reachable (CI here, air-gapped hosts): elsewhere
# `docker-compose build` pulls the official image and this script is never run. The image is made
# with `debootstrap --variant=minbase bookworm`, given what the Dockerfile expects of the official
# image (python3.11, pip and venv with python/pip in /usr/local/bin and packages in
# /usr/local/lib/python3.11/site-packages, CA certificates, LANG=C.UTF-8), plus this machine's CA
# bundle so that pip inside a build trusts whatever TLS proxy this machine trusts, and imported
# under exactly the name the Dockerfile's FROM line gives.
#
# Cached by content: an image with that tag whose label holds the hash of this script and of the
# CA bundle is reused; --force rebuilds. Needs root (debootstrap, chroot) and a Debian mirror
# (MIRROR, default http://deb.debian.org/debian).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
dockerfile="${DOCKERFILE:-$here/../Dockerfile}"
mirror="${MIRROR:-http://deb.debian.org/debian}"
ca_bundle="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
label=org.cnn-image-retrieval.base-image-hash
force=0
[[ "${1:-}" == "--force" ]] && force=1

# The one base image the Dockerfile names: the first FROM line (no multi-stage builds).
image="$(awk 'toupper($1) == "FROM" { print $2; exit }' "$dockerfile")"
[[ -n "$image" ]] || { echo "no FROM line in $dockerfile" >&2; exit 2; }
case "$image" in
    python:3.11-slim-bookworm|python:3.11-slim|python:3.11-bookworm) ;;
    *) echo "this script builds python:3.11-slim-bookworm; the Dockerfile names $image" >&2; exit 2 ;;
esac

hash="$( { cat "$0"; cat "$ca_bundle" 2>/dev/null || true; } | sha256sum | cut -c1-16)"
if [[ $force == 0 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    built="$(docker image inspect -f "{{ index .Config.Labels \"$label\" }}" "$image")"
    if [[ "$built" == "$hash" ]]; then
        echo "$image: up to date (hash $hash)"
        exit 0
    elif [[ -z "$built" || "$built" == "<no value>" ]]; then
        echo "$image: the image from the registry is here; nothing to build"
        exit 0
    fi
fi
[[ $(id -u) == 0 ]] || { echo "debootstrap needs root" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install debootstrap)" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/var/tmp}/base-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT
root="$work/root"
echo "$image: debootstrap bookworm into $root ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

# This machine's CA certificates that Debian's bundle lacks (a TLS-inspecting proxy's, say), added
# the Debian way so that update-ca-certificates in a derived image keeps them.
if [[ -r "$ca_bundle" ]]; then
    mkdir -p "$root/usr/local/share/ca-certificates/host"
    python3 - "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt" "$root/usr/local/share/ca-certificates/host" <<'PY'
import re, sys
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
host, debian, out = (open(sys.argv[1]).read(), open(sys.argv[2]).read(), sys.argv[3])
known = {"".join(c.split()) for c in pem.findall(debian)}
extra = [c for c in pem.findall(host) if "".join(c.split()) not in known]
for i, cert in enumerate(extra):
    open(f"{out}/host-{i:03d}.crt", "w").write(cert + "\n")
print(f"{len(extra)} CA certificate(s) from {sys.argv[1]} added")
PY
    chroot "$root" update-ca-certificates >/dev/null 2>&1   # (its c_rehash warns about the bundle file itself)
    # pip's own bundle (certifi) is not the system's: point it there, as this machine does.
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
fi

# The official image's layout: python3.11 with pip in /usr/local. A venv rooted at /usr/local gives
# exactly those paths (and lets pip install there without Debian's externally-managed guard).
chroot "$root" /usr/bin/python3 -m venv /usr/local
chroot "$root" sh -c 'cd /usr/local/bin && ln -sf python3 python && ln -sf pip3 pip && /usr/local/bin/python --version && /usr/local/bin/pip --version'

# Slim it as the official image is slimmed.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
       "$root"/usr/share/locale/* "$root"/var/cache/debconf/*-old "$root"/var/log/*.log
find "$root" -name __pycache__ -type d -prune -exec rm -rf {} +

pyver="$(chroot "$root" /usr/local/bin/python -c 'import platform; print(platform.python_version())')"
tar -C "$root" --numeric-owner -c . | docker import \
    --change "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin" \
    --change "ENV LANG=C.UTF-8" \
    --change "ENV PYTHON_VERSION=$pyver" \
    --change "LABEL $label=$hash" \
    --change 'CMD ["python3"]' \
    - "$image" >/dev/null
echo "$image: built locally (python $pyver, hash $hash, $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'))"
