#!/usr/bin/env bash
# The README's demo: vmkeepd as a service in a private systemd, two VMs on the tiny guest,
# the daemon restarted and SIGKILLed, both VMs still running and reattached.
set -euo pipefail
cd "$(dirname "$0")/.."
bash test/setup.sh
exec node dist/test/demo/main.js
