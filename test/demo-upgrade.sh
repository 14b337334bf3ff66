#!/usr/bin/env bash
# The package maintainer's demo: "version A" of the vmkeep snap runs three VMs, a snap refresh
# to "version B" done the way snapd does it, the VMs alive and stale, then refreshed by live
# migration onto version B's QEMU, each with its guest downtime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash test/setup.sh
exec node dist/test/demo/upgrade.js
