# Builds the Flower SuperLink or SuperNode QCOW2 image for OpenNebula from an Ubuntu 24.04
# cloud image (or a local base image in INPUT_DIR):
#
#   make -C packer build ROLE=superlink        # or ROLE=supernode; `make all` builds both
#
# It runs the same recipe as the offline builder (scripts/provision.sh, scripts/finalize.sh),
# with the real one-context package installed last: one-context removes cloud-init, so
# nothing after it may need cloud-init (the shutdown command does not). Needs KVM and the
# internet. Packer >= 1.7 also reads versions.pkr.hcl (the qemu plugin); Packer 1.6.6 runs
# `validate -syntax-only` on this file alone.

variable "role" {
  type        = string
  description = "superlink or supernode"
}

variable "flower_version" {
  type        = string
  default     = "1.25.0"
  description = "Flower version installed into the image's virtualenv (and pulled with runtime=docker)."
}

variable "runtime" {
  type        = string
  default     = "process"
  description = "Runtime the image contains and defaults to: process (the Flower virtualenv) or docker (Docker + flwr/<role> images)."
}

variable "flower_extras" {
  type        = string
  default     = ""
  description = "Extra pip requirements for the virtualenv, e.g. \"torch torchvision\" (off by default)."
}

variable "nvidia_toolkit" {
  type        = bool
  default     = false
  description = "SuperNode with runtime=docker: install the NVIDIA container toolkit for GPU passthrough."
}

variable "input_dir" {
  type        = string
  default     = ""
  description = "Directory holding ubuntu2404.qcow2 (e.g. a one-apps export); empty: download the cloud image."
}

variable "base_image_url" {
  type        = string
  default     = "https://cloud-images.ubuntu.com/releases/24.04/release/ubuntu-24.04-server-cloudimg-amd64.img"
  description = "Cloud image the appliance is built from when input_dir is empty."
}

variable "base_image_checksum" {
  type        = string
  default     = "file:https://cloud-images.ubuntu.com/releases/24.04/release/SHA256SUMS"
  description = "Checksum of the base image (or a file: URL of a SHA256SUMS list)."
}

variable "agent_binary" {
  type        = string
  default     = "../target/x86_64-unknown-linux-musl/release/flower-agent"
  description = "Static flower-agent (`make agent`: --no-default-features, x86_64-unknown-linux-musl)."
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

locals {
  # OpenNebula disks of the reference appliances: 10 GB SuperLink, 20 GB SuperNode.
  disk_size = var.role == "supernode" ? "20480M" : "10240M"
  base_url  = var.input_dir != "" ? "${var.input_dir}/ubuntu2404.qcow2" : var.base_image_url
  base_sum  = var.input_dir != "" ? "none" : var.base_image_checksum
  stage     = "/tmp/flower-provision"
  env = [
    "FLOWER_STAGE=/tmp/flower-provision",
    "ROLE=${var.role}",
    "FLOWER_VERSION=${var.flower_version}",
    "RUNTIME=${var.runtime}",
    "FLOWER_EXTRAS=${var.flower_extras}",
  ]
}

source "qemu" "flower" {
  iso_url          = local.base_url
  iso_checksum     = local.base_sum
  disk_image       = true
  disk_size        = local.disk_size
  format           = "qcow2"
  accelerator      = "kvm"
  headless         = true
  memory           = 4096
  cpus             = 2
  net_device       = "virtio-net"
  disk_interface   = "virtio"
  output_directory = "${var.output_dir}/${var.role}"
  vm_name          = "flower-${var.role}.qcow2"
  # cloud-init seed made by `make seed`: a build-only root password and an sshd drop-in
  # that allows it; finalize.sh removes both.
  qemuargs         = [["-cdrom", "${var.output_dir}/seed.iso"], ["-serial", "mon:stdio"]]
  ssh_username     = "root"
  ssh_password     = "opennebula"
  ssh_timeout      = "20m"
  shutdown_command = "shutdown -P now"
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
      "mkdir -p ${local.stage}",
    ]
  }

  provisioner "file" {
    sources = [
      var.agent_binary,
      "../appliance/${var.role}/appliance.sh",
      "../e2e/requirements.lock",
      "files/ssh-hostkeys.service",
    ]
    destination = "${local.stage}/"
  }

  provisioner "shell" {
    environment_vars = local.env
    script           = "scripts/provision.sh"
  }

  provisioner "shell" {
    environment_vars = ["ROLE=${var.role}", "NVIDIA_TOOLKIT=${var.nvidia_toolkit}", "RUNTIME=${var.runtime}"]
    script           = "scripts/install-nvidia-toolkit.sh"
  }

  # one-context and the one-apps framework last: one-context removes cloud-init.
  provisioner "shell" {
    environment_vars = ["ONE_APPS_REF=${var.one_apps_ref}", "ONE_CONTEXT_DEB_URL=${var.one_context_deb_url}"]
    script           = "scripts/install-one-apps.sh"
  }

  provisioner "shell" {
    script = "scripts/finalize.sh"
  }
}
