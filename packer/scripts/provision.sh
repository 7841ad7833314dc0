#!/usr/bin/env bash
# The one provisioning recipe of the Flower appliance images. Both builders run it as root
# inside the image being built: Packer over SSH in a VM (flower-appliance.pkr.hcl) and the
# offline builder in an mmdebstrap chroot (build-image.sh). Never run at VM boot.
#
# Inputs: the staging directory $FLOWER_STAGE (flower-agent, appliance.sh,
# requirements.lock, ssh-hostkeys.service, optionally wheels/ to install Flower offline) and
# ROLE (not needed by PHASE=base), FLOWER_VERSION, RUNTIME (process|docker), FLOWER_EXTRAS
# (extra pip requirements, e.g. "torch torchvision"; none by default). finalize.sh
# (hardening, clean-up) runs after it.
#
# PHASE (default all) splits the recipe in two for the offline builder, which builds the
# role-independent part once and derives both roles from it:
#   base  packages and the Flower virtualenv (needs requirements.lock and wheels/ only);
#   role  flower-agent, the appliance script, /opt/flower and the units (and, with
#         RUNTIME=docker, the role's Flower image);
#   all   base then role, in one run (the Packer build).
set -euo pipefail
stage="${FLOWER_STAGE:-/tmp/flower-provision}"
role="${ROLE:-}"
version="${FLOWER_VERSION:?FLOWER_VERSION must name the Flower release}"
runtime="${RUNTIME:-process}"
extras="${FLOWER_EXTRAS:-}"
phase="${PHASE:-all}"
case "$phase" in base | role | all) ;; *) echo "PHASE=$phase: base, role or all" >&2; exit 2 ;; esac
# The base is the same for both roles: it needs none.
case "$phase:$role" in base:* | *:superlink | *:supernode) ;; *) echo "ROLE=$role: superlink or supernode" >&2; exit 2 ;; esac
case "$runtime" in process | docker) ;; *) echo "RUNTIME=$runtime: process or docker" >&2; exit 2 ;; esac
if ! [[ "$version" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  echo "FLOWER_VERSION=$version: X.Y.Z" >&2
  exit 2
fi
export DEBIAN_FRONTEND=noninteractive
venv=/opt/flower/venv

provision_base() {
  echo "provision: packages"
  apt-get update -q
  apt-get install -y -q --no-install-recommends \
    ca-certificates openssh-server python3 python3-venv iproute2
  if [ "$runtime" = docker ]; then
    apt-get install -y -q --no-install-recommends docker.io
  fi

  echo "provision: Flower $version virtualenv at $venv"
  # Every dependency at the version the test suite runs (e2e/requirements.lock), flwr at
  # the image's version: the process runtime needs no network at boot.
  # With $stage/wheels (the offline builder) nothing is fetched here.
  grep -v '^flwr==' "$stage/requirements.lock" >"$stage/constraints.txt"
  python3 -m venv "$venv"
  local extra_reqs source_args=()
  read -r -a extra_reqs <<<"$extras"
  if [ -d "$stage/wheels" ]; then source_args=(--no-index --find-links "$stage/wheels"); fi
  "$venv/bin/pip" install --no-cache-dir --disable-pip-version-check -q "${source_args[@]}" \
    -c "$stage/constraints.txt" "flwr==$version" numpy "${extra_reqs[@]}"
  "$venv/bin/flower-superlink" --help >/dev/null
  "$venv/bin/flower-supernode" --help >/dev/null
  "$venv/bin/python" -c 'import numpy'
}

provision_role() {
  echo "provision: flower-agent and the one-apps appliance script"
  install -m 0755 "$stage/flower-agent" /usr/local/bin/flower-agent
  /usr/local/bin/flower-agent --version
  install -d -m 0750 /etc/one-appliance /etc/one-appliance/service.d
  install -m 0640 "$stage/appliance.sh" /etc/one-appliance/service.d/appliance.sh
  [ -x "$venv/bin/flower-superlink" ] || { echo "no Flower virtualenv at $venv (PHASE=base first)" >&2; exit 1; }
  if [ "$runtime" = docker ]; then
    # The seed's container layout: Flower's images, pulled while the build has a network.
    systemctl start docker
    docker pull "flwr/$role:$version"
    # The digest the units run (#17 item 5): the agent refuses a tag without one here.
    install -d -m 0755 /opt/flower
    printf '%s %s\n' "flwr/$role:$version" \
      "$(docker image inspect --format '{{index .RepoDigests 0}}' "flwr/$role:$version")" \
      >/opt/flower/images.lock
    systemctl stop docker
  fi

  echo "provision: /opt/flower, units (role $role, runtime $runtime)"
  /usr/local/bin/flower-agent --role "$role" install --flower-version "$version" --runtime "$runtime"
  install -m 0644 "$stage/ssh-hostkeys.service" /etc/systemd/system/flower-ssh-hostkeys.service
  systemctl enable flower-agent.service flower-agent-context.service flower-ssh-hostkeys.service
}

case "$phase" in
  base) provision_base ;;
  role) provision_role ;;
  all)
    # Separate commands: errexit does not apply inside a function on the left of `&&`.
    provision_base
    provision_role
    ;;
esac
echo "provision: done ($phase)"
