#!/usr/bin/env bash
# The full test suite: set-up, then unit and integration tests on a real QEMU and a real
# (private) systemd. Ends with one line "vitest: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."
bash test/setup.sh
report=$(mktemp /tmp/vmkeep-vitest.XXXXXX.json)
trap 'rm -f "$report"' EXIT
status=0
npx vitest run --reporter=default --reporter=json --outputFile="$report" "$@" || status=$?
node -e '
  const r = JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"));
  const skipped = r.numPendingTests + r.numTodoTests;
  console.log(`vitest: ${r.numPassedTests} passed, ${r.numFailedTests} failed` + (skipped ? `, ${skipped} skipped` : ""));
' "$report" || true
exit "$status"
