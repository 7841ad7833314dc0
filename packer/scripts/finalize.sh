#!/usr/bin/env bash
# Hardening and clean-up, the last step of both builders (after provision.sh and, in the
# Packer build, one-context): key-only SSH, build-time logins reverted, nothing of the build
# left behind (host keys, authorized keys, machine-id, logs, apt lists). No secret remains.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

echo "finalize: SSH keys only, root without a password"
install -d -m 0755 /etc/ssh/sshd_config.d
# sshd takes the first value it reads: 00- comes before every other drop-in.
cat >/etc/ssh/sshd_config.d/00-flower-hardening.conf <<'CONF'
# Flower appliance: key-only SSH (keys come from the SSH_PUBLIC_KEY context variable).
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
CONF
# Build-time login settings (cloud-init's and the build's own).
rm -f /etc/ssh/sshd_config.d/50-cloud-init.conf /etc/ssh/sshd_config.d/60-cloudimg-settings.conf \
  /etc/ssh/sshd_config.d/99-flower-build.conf
sed -i -E 's/^[[:space:]]*(PermitRootLogin|PasswordAuthentication)[[:space:]]+yes/#&/' /etc/ssh/sshd_config
usermod -p '*' root

echo "finalize: clean-up"
if dpkg -s cloud-init >/dev/null 2>&1; then apt-get purge -y -q cloud-init; fi
apt-get autoremove -y -q
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
rm -f /etc/ssh/ssh_host_*
rm -f /root/.ssh/authorized_keys /root/.bash_history
rm -rf /root/.cache /tmp/* /var/tmp/* /context
# Nothing the agent generates at boot may be baked in.
rm -rf /opt/flower/certs/* /opt/flower/ca/* /opt/flower/config/* /opt/flower/state/*
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /var/log/journal/*
truncate -s 0 /etc/machine-id
if [ -f /var/lib/dbus/machine-id ] && [ ! -L /var/lib/dbus/machine-id ]; then
  rm -f /var/lib/dbus/machine-id
fi
sync
echo "finalize: done"
