#!/usr/bin/env bash
# Make a Debian bookworm base image (Python 3.11 with venv and pip, CA certificates) with mmdebstrap and
# import it into podman, for machines that reach Debian's mirror but no container registry. Build on it with
#   podman build --format docker --build-arg BASE_IMAGE=localhost/flamingo-base:bookworm .
# Usage: scripts/container-base.sh [IMAGE_NAME]; an image already there is kept (podman rmi it to remake it).
set -euo pipefail

name=${1:-localhost/flamingo-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

for tool in mmdebstrap podman; do
    if ! command -v "$tool" > /dev/null; then
        echo "$tool is missing: apt-get install -y mmdebstrap podman runc" >&2
        exit 1
    fi
done
if podman image exists "$name"; then
    exit 0
fi
echo "Making $name with mmdebstrap..." >&2
# minbase, no Recommends and no documentation (but the licences): what the bot needs and little else.
mmdebstrap --variant=minbase --include=python3.11,python3-venv,python3-pip,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm - "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
    "deb $security bookworm-security main" |
    podman import --quiet --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$name" > /dev/null
podman image ls "$name"
