// The fault harness on the real thing: random API operations on a few VMs (real QEMUs booting the
// tiny guest, vmkeepd as a service of a private systemd), with faults at random points (vmkeepd
// SIGKILLed or restarted, a QEMU SIGSTOPped or killed, a burst of STOP/RESUME events, an
// oversized QMP reply), and the invariants checked from outside after each sequence. Seeded;
// VMKEEP_FAULT_REAL_SEQUENCES sets how many (CI runs a bounded number, npm run bench more).
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { seededRandom } from '../support/seeded-random.js';
import { DaemonError } from '../../daemon/index.js';
import { DaemonHost } from '../support/daemon-host.js';
import { ensureGuestImage, type GuestImage } from '../support/guest.js';
import { qemuPidsOf } from '../support/qemu-procs.js';

const SEQUENCES = Number(process.env.VMKEEP_FAULT_REAL_SEQUENCES ?? 2);
const OPS_PER_SEQUENCE = 14;
const NAMES = ['f0', 'f1', 'f2'];
const EXPECTED_CODES = new Set([
  'BUSY', 'CONFLICT', 'EXISTS', 'NOT_FOUND', 'UNREACHABLE', 'STOP_TIMEOUT', 'DAEMON_DOWN', 'QMP_FAILED',
]);

let guest: GuestImage;
let host: DaemonHost;
const stopped = new Set<number>();

beforeAll(async () => {
  guest = await ensureGuestImage();
  host = await DaemonHost.boot({ name: `fh-${process.pid}` });
});

afterAll(async () => {
  for (const pid of stopped) continueProcess(pid);
  await host?.shutdown();
});

function continueProcess(pid: number): void {
  try {
    process.kill(pid, 'SIGCONT');
  } catch {
    // gone
  }
}

function spec(name: string): Record<string, unknown> {
  return { name, kernel: guest.kernel, initrd: guest.initrd, append: guest.append, memoryMiB: 96 };
}

describe('fault harness (real QEMU, real systemd)', () => {
  it(`keeps every invariant through ${SEQUENCES} random sequences of operations and faults`, async () => {
    const tally = { sequences: 0, operations: 0, faults: 0 };
    for (let seq = 0; seq < SEQUENCES; seq++) {
      const seed = 7000 + seq;
      const rnd = seededRandom(seed);
      const pick = <T>(items: readonly T[]): T => items[Math.floor(rnd() * items.length)] as T;
      const lastAck = new Map<string, 'create' | 'delete'>();
      const unexpected: string[] = [];
      const inFlight: Array<Promise<unknown>> = [];
      const track = (name: string, what: 'create' | 'delete' | 'other', op: Promise<unknown>): void => {
        inFlight.push(op.then(() => {
          if (what !== 'other') lastAck.set(name, what);
        }, (error: unknown) => {
          const code = error instanceof DaemonError ? error.code : undefined;
          if (code === undefined || !EXPECTED_CODES.has(code)) unexpected.push(`${what} ${name}: ${code}: ${(error as Error).message}`);
        }));
      };
      for (let i = 0; i < OPS_PER_SEQUENCE; i++) {
        const name = pick(NAMES);
        const roll = rnd();
        tally.operations++;
        if (roll < 0.2) track(name, 'create', host.api.create(spec(name)));
        else if (roll < 0.32) track(name, 'other', host.api.start(name));
        else if (roll < 0.46) track(name, 'other', host.api.stop(name, { timeoutSec: 8 }));
        else if (roll < 0.56) track(name, 'delete', host.api.delete(name));
        else if (roll < 0.62) track(name, 'other', host.api.qmp(name, 'query-status'));
        else {
          tally.faults++;
          const vm = await host.api.get(name).catch(() => undefined);
          const pid = vm?.pid === undefined ? undefined : qemuPidsOf(name, host.dir)[0];
          const fault = pick(['kill-daemon', 'restart-daemon', 'sigstop', 'sigcont', 'kill-qemu', 'events', 'huge'] as const);
          switch (fault) {
            case 'kill-daemon':
              // Requests in flight get DAEMON_DOWN or are answered by the next daemon.
              await Promise.allSettled(inFlight);
              await host.killAndStart();
              break;
            case 'restart-daemon':
              await Promise.allSettled(inFlight);
              await host.restart();
              break;
            case 'sigstop':
              if (pid !== undefined) {
                process.kill(pid, 'SIGSTOP');
                stopped.add(pid);
              }
              break;
            case 'sigcont':
              if (pid !== undefined) continueProcess(pid);
              break;
            case 'kill-qemu':
              if (pid !== undefined) process.kill(pid, 'SIGKILL');
              break;
            case 'events':
              for (let k = 0; k < 20; k++) track(name, 'other', host.api.qmp(name, k % 2 === 0 ? 'stop' : 'cont'));
              break;
            case 'huge':
              track(name, 'other', host.api.qmp(name, 'human-monitor-command', { 'command-line': 'xp /200000xg 0' }));
              break;
          }
        }
      }
      // Lift every fault, let everything answer, restart once, then look from outside.
      for (const pid of stopped) continueProcess(pid);
      stopped.clear();
      await Promise.allSettled(inFlight);
      await host.killAndStart();
      await settle();

      const problems = [...unexpected];
      const listed = await host.api.list();
      const onDisk = (await host.recordNames()).sort();
      expect(listed.map((v) => v.name).sort(), `seed ${seed}: listed vs on disk`).toEqual(onDisk);
      for (const name of NAMES) {
        const live = qemuPidsOf(name, host.dir);
        const vm = listed.find((v) => v.name === name);
        if (live.length > 1) problems.push(`${name}: ${live.length} QEMUs run`);
        if (live.length > 0 && vm === undefined) problems.push(`${name}: a QEMU runs without a record`);
        if (vm && (vm.state === 'running' || vm.state === 'paused') && (vm.pid === undefined || !live.includes(host.hostPid(vm)))) {
          problems.push(`${name}: reported ${vm.state}, but its pid does not run`);
        }
        if (lastAck.get(name) === 'delete' && vm !== undefined) problems.push(`${name}: an acknowledged delete came back`);
      }
      const orphans = (await host.api.info()).orphanScopes;
      if (orphans.length > 0) problems.push(`orphan scopes: ${orphans.join(', ')}`);
      expect(problems, `seed ${seed}`).toEqual([]);
      tally.sequences++;
    }
    console.log(`fault harness (real QEMU): ${tally.sequences} sequences, ${tally.operations} operations, ${tally.faults} faults, 0 invariant violations`);
  }, 600_000);
});

/** Every VM has settled: no operation holds it and none waits for a reattach retry. */
async function settle(): Promise<void> {
  const deadline = Date.now() + 60_000;
  for (;;) {
    const vms = await host.api.list();
    const busy = vms.filter((v) => v.operation !== undefined || v.state === 'unreachable' || v.state === 'starting');
    if (busy.length === 0) return;
    if (Date.now() > deadline) throw new Error(`VMs did not settle: ${busy.map((v) => `${v.name} ${v.state} ${v.problem ?? ''}`).join('; ')}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
