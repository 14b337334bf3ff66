#!/usr/bin/env bash
# The README's demo: boots the tiny test guest with `vmkeep run`, lets it tick, then does
# what a user's Ctrl-C does and shows the guest powering off cleanly through ACPI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash test/setup.sh

guest=$(bash test/guest/build-guest.sh | tail -n 1)
work=$(mktemp -d /tmp/vmkeep-demo.XXXXXX)
run_pid=
cleanup() {
  if [ -n "$run_pid" ] && kill -0 "$run_pid" 2>/dev/null; then kill -TERM "$run_pid" 2>/dev/null || true; wait "$run_pid" || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/demo.json" <<JSON
{
  "name": "demo",
  "memoryMiB": 256,
  "kernel": "$guest/vmlinuz",
  "initrd": "$guest/initramfs.gz",
  "append": "console=ttyS0 quiet panic=-1"
}
JSON
echo "== spec: $work/demo.json"
cat "$work/demo.json"

echo "== vmkeep run demo.json (guest console follows)"
node dist/cli/main.js run "$work/demo.json" --state-dir "$work/state" &
run_pid=$!

# Wait for the third tick on the console: the guest is up and running.
for _ in $(seq 1 600); do
  grep -q 'GUEST TICK 3' "$work/state/serial.log" 2>/dev/null && break
  kill -0 "$run_pid" 2>/dev/null || { echo "vmkeep run ended early" >&2; exit 1; }
  sleep 0.1
done
grep -q 'GUEST TICK 3' "$work/state/serial.log" || { echo "the guest did not tick within 60 s" >&2; exit 1; }

echo "== Ctrl-C (SIGINT): vmkeep asks the guest to power off through ACPI"
kill -INT "$run_pid"
status=0
wait "$run_pid" || status=$?
run_pid=
echo "== vmkeep run exited with $status (0: the guest powered off cleanly)"
exit "$status"
