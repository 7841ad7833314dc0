#!/usr/bin/env bash
# Packer build only: the NVIDIA container toolkit for GPU SuperNodes on the docker runtime
# (variable nvidia_toolkit). A no-op unless NVIDIA_TOOLKIT=true, ROLE=supernode and
# RUNTIME=docker. The GPU driver itself belongs to the host image or a later layer.
set -euo pipefail
if [ "${NVIDIA_TOOLKIT:-false}" != true ]; then exit 0; fi
if [ "${ROLE:-}" != supernode ] || [ "${RUNTIME:-}" != docker ]; then
  echo "nvidia_toolkit needs role=supernode and runtime=docker" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends curl gnupg
curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey |
  gpg --batch --yes --dearmor -o /usr/share/keyrings/nvidia-container-toolkit.gpg
curl -fsSL https://nvidia.github.io/libnvidia-container/stable/deb/nvidia-container-toolkit.list |
  sed 's#deb https://#deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit.gpg] https://#' \
    >/etc/apt/sources.list.d/nvidia-container-toolkit.list
apt-get update -q
apt-get install -y -q nvidia-container-toolkit
nvidia-ctk runtime configure --runtime=docker
