# Builds the Flower SuperLink or SuperNode appliance image (QCOW2) for OpenNebula.
#
#   make -C packer build ROLE=superlink        # or ROLE=supernode
#
# Both images carry the same static `flower-agent`; the role only selects the thin one-apps
# script under appliance/<role>/ and what `flower-agent install` pre-bakes. Written for the
# built-in qemu builder so that `packer validate -syntax-only` works offline on Packer 1.6
# (newer Packer needs a `required_plugins` block for the external qemu plugin; add it there).

variable "role" {
  type        = string
  description = "superlink or supernode"
}

variable "flower_version" {
  type        = string
  default     = "1.25.0"
  description = "Flower version pre-baked into the image (the agent pulls or builds nothing else at boot)."
}

variable "base_image_url" {
  type        = string
  default     = "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
  description = "Cloud image the appliance is built from."
}

variable "base_image_checksum" {
  type        = string
  default     = "file:https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS"
  description = "Checksum of the base image (or a file: URL of a SHA256SUMS list)."
}

variable "agent_binary" {
  type        = string
  default     = "../target/x86_64-unknown-linux-musl/dist/flower-agent"
  description = "Static flower-agent built with `cargo build --profile dist --no-default-features --target x86_64-unknown-linux-musl`."
}

variable "one_apps_ref" {
  type        = string
  default     = "v7.2.1"
  description = "Tag of OpenNebula/one-apps whose appliance framework (service.sh) the image uses."
}

variable "one_context_deb_url" {
  type        = string
  default     = "https://github.com/OpenNebula/one-apps/releases/download/v6.10.0-3/one-context_6.10.0-3.deb"
  description = "Released one-context package installed into the image."
}

variable "output_dir" {
  type    = string
  default = "build"
}

variable "disk_size" {
  type        = string
  default     = "12288M"
  description = "Root disk; the stock 3.5 GB cloud image is too small for Docker images."
}

source "qemu" "flower" {
  iso_url          = var.base_image_url
  iso_checksum     = var.base_image_checksum
  disk_image       = true
  disk_size        = var.disk_size
  format           = "qcow2"
  accelerator      = "kvm"
  headless         = true
  memory           = 4096
  cpus             = 2
  net_device       = "virtio-net"
  disk_interface   = "virtio"
  output_directory = "${var.output_dir}/${var.role}"
  vm_name          = "flower-${var.role}-${var.flower_version}.qcow2"
  # cloud-init seed (user root / password opennebula, reset at first boot by
  # USERNAME_PASSWORD_RESET=YES in the VM template) made by `make seed`.
  qemuargs         = [["-cdrom", "${var.output_dir}/seed.iso"]]
  ssh_username     = "root"
  ssh_password     = "opennebula"
  ssh_timeout      = "20m"
  shutdown_command = "cloud-init clean --logs && poweroff"
}

build {
  sources = ["source.qemu.flower"]

  # needrestart restarts sshd in the middle of apt runs and Packer loses the session.
  provisioner "shell" {
    inline = [
      "set -eu",
      "cloud-init status --wait || true",
      "export DEBIAN_FRONTEND=noninteractive",
      "apt-get purge -y needrestart || true",
      "apt-get update -q",
      "apt-get install -y -q ca-certificates curl",
    ]
  }

  # one-context (contextualisation) and the one-apps appliance framework.
  provisioner "shell" {
    environment_vars = ["ONE_APPS_REF=${var.one_apps_ref}", "ONE_CONTEXT_DEB_URL=${var.one_context_deb_url}"]
    script           = "scripts/install-one-apps.sh"
  }

  provisioner "file" {
    source      = var.agent_binary
    destination = "/usr/local/bin/flower-agent"
  }

  provisioner "file" {
    source      = "../appliance/${var.role}/appliance.sh"
    destination = "/etc/one-appliance/service.d/appliance.sh"
  }

  # `service install` runs `flower-agent install --role <role>`: the /opt/flower tree,
  # UID/GID 49999, PREBAKED_VERSION, units and the Flower container image.
  provisioner "shell" {
    environment_vars = ["FLOWER_VERSION=${var.flower_version}"]
    inline = [
      "set -eu",
      "chmod 0755 /usr/local/bin/flower-agent",
      "/usr/local/bin/flower-agent --version",
      "/etc/one-appliance/service install ${var.flower_version}",
      "apt-get clean",
      "rm -rf /var/lib/apt/lists/*",
    ]
  }
}
