#!/usr/bin/env bash
# Installs one-context and the one-apps appliance framework (service.sh and its libraries)
# from a pinned one-apps release. Runs inside the image being built, never at VM boot.
set -euo pipefail
ref="${ONE_APPS_REF:?ONE_APPS_REF must name a one-apps tag}"
context_deb_url="${ONE_CONTEXT_DEB_URL:?ONE_CONTEXT_DEB_URL must point at a released one-context .deb}"
raw="https://raw.githubusercontent.com/OpenNebula/one-apps/${ref}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

curl -fsSL -o "$work/one-context.deb" "$context_deb_url"
apt-get install -y -q "$work/one-context.deb"

install -d -m 0755 /etc/one-appliance /etc/one-appliance/lib /etc/one-appliance/service.d /opt/one-appliance
fetch() { curl -fsSL -o "$2" "$raw/$1"; chmod "$3" "$2"; }
fetch appliances/service.sh /etc/one-appliance/service 0755
fetch appliances/lib/common.sh /etc/one-appliance/lib/common.sh 0644
fetch appliances/lib/functions.sh /etc/one-appliance/lib/functions.sh 0644
# Context hooks: configure + bootstrap at every network stage, then READY reporting.
fetch appliances/scripts/net-90-service-appliance /etc/one-context.d/net-90-service-appliance 0755
fetch appliances/scripts/net-99-report-ready /etc/one-context.d/net-99-report-ready 0755
