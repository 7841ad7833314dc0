# Read by Packer >= 1.7 (`packer init .` / `packer build .`), which takes the qemu builder
# from this plugin. Debian's Packer 1.6.6 has the builder built in and rejects this block,
# so it lives in its own file and `make validate` checks flower-appliance.pkr.hcl alone.
packer {
  required_plugins {
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.1.0"
    }
  }
}
