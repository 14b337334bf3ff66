// The fault harnesses at a larger size than CI runs them: thousands of seeded sequences on the
// fake QEMU, a few on real QEMUs and a real systemd. Each runs as its vitest file in a child
// process; the figures come from the summary line it prints.
import { execa } from 'execa';
import { projectRoot } from '../support/paths.js';
import { log, met, type Row, type Section } from './common.js';

const UNIT_SEQUENCES = 2000;
const REAL_SEQUENCES = 6;

interface Figures { sequences: number; operations: number; faults: number; violations: number; ms?: number }

async function runHarness(file: string, env: Record<string, string>, summary: RegExp): Promise<Figures> {
  log(`fault harness: ${file}`);
  const result = await execa('npx', ['vitest', 'run', file], { cwd: projectRoot(), env, reject: false, all: true });
  const match = summary.exec(result.all ?? '');
  if (result.exitCode !== 0 || match === null) {
    throw new Error(`${file} failed (exit ${result.exitCode}): ${(result.all ?? '').split('\n').filter((l) => /seed|violation|Error/.test(l)).slice(0, 5).join(' | ')}`);
  }
  const [, sequences, operations, faults, violations, ms] = match.map(Number);
  return { sequences: sequences ?? 0, operations: operations ?? 0, faults: faults ?? 0, violations: violations ?? 0, ...(ms === undefined || Number.isNaN(ms) ? {} : { ms }) };
}

function row(what: string, f: Figures): Row {
  return {
    what: `${what}: ${f.operations} operations, ${f.faults} faults, ${f.violations} invariant violations${f.ms === undefined ? '' : ` (${(f.ms / 1000).toFixed(1)} s)`}`,
    n: f.sequences, median: '—', p99: '—', target: '0 violations', met: met(f.violations === 0),
  };
}

export async function benchFaults(): Promise<Section> {
  const unit = await runHarness('test/unit/daemon/fault-harness.test.ts', { VMKEEP_FAULT_SEQUENCES: String(UNIT_SEQUENCES) },
    /fault harness: (\d+) sequences, (\d+) operations, (\d+) faults, (\d+) invariant violations, (\d+) ms/);
  const real = await runHarness('test/integration/fault-harness.test.ts', { VMKEEP_FAULT_REAL_SEQUENCES: String(REAL_SEQUENCES) },
    /fault harness \(real QEMU\): (\d+) sequences, (\d+) operations, (\d+) faults, (\d+) invariant violations/);
  return {
    title: '8. Fault harness',
    rows: [row('fake QEMU (test/unit/daemon/fault-harness.test.ts)', unit), row('real QEMU + systemd (test/integration/fault-harness.test.ts)', real)],
    notes: [
      'Seeded random sequences of create, start, stop, delete, refresh and QMP calls on three VMs, concurrently, with faults at random points: vmkeepd restarted or SIGKILLed, the state folder full (fake only), a QEMU SIGSTOPped or killed, a burst of STOP/RESUME events, a QMP reply over the line limit. After each sequence: what the API lists equals the records on disk, at most one QEMU per VM and none without a record, every VM reported running has a live QEMU with that PID, no orphan scope, no acknowledged delete comes back.',
      `CI runs 150 fake and 2 real sequences; this bench runs ${UNIT_SEQUENCES} and ${REAL_SEQUENCES}. A failure names its seed (VMKEEP_FAULT_SEED=N reruns it).`,
    ],
  };
}
