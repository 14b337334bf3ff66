// Randomized sequences of API operations on a few VMs, run concurrently on the fake QEMU host,
// with faults injected at random points (daemon restart, full disk, SIGSTOP, a killed QEMU, an
// event flood, an oversized reply). After each sequence the invariants of ARCHITECTURE.md are
// checked. Seeded: a failure prints its seed; VMKEEP_FAULT_SEED=N reruns exactly that one, and
// VMKEEP_FAULT_SEQUENCES sets how many run (npm run bench runs more).
import { afterEach, describe, expect, it } from 'vitest';
import { seededRandom } from '../../support/seeded-random.js';
import { DaemonError } from '../../../daemon/index.js';
import { openWorld, type World } from './manager-world.js';

const SEQUENCES = Number(process.env.VMKEEP_FAULT_SEQUENCES ?? 150);
const OPS_PER_SEQUENCE = 24;
const NAMES = ['v0', 'v1', 'v2'];
/** Errors an operation may end with under faults; anything else is a bug. */
const EXPECTED_CODES = new Set([
  'BUSY', 'CONFLICT', 'EXISTS', 'NOT_FOUND', 'UNREACHABLE', 'STOP_TIMEOUT', 'STATE_IO', 'DAEMON_DOWN',
  'START_FAILED', 'SPEC_REJECTED', 'QMP_FAILED', 'REFRESH_FAILED', 'REFRESH_REFUSED',
]);

interface Tally { sequences: number; operations: number; faults: number; violations: number }

let world: World | undefined;
afterEach(async () => {
  await world?.close();
  world = undefined;
});

async function runSequence(seed: number, tally: Tally): Promise<void> {
  const rnd = seededRandom(seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(rnd() * items.length)] as T;
  const w = await openWorld({ retryIntervalMs: 20, healthIntervalMs: 25 });
  world = w;
  const lastAck = new Map<string, 'create' | 'delete'>();
  const unexpected: string[] = [];
  const inFlight: Array<Promise<unknown>> = [];
  const trace = process.env.VMKEEP_FAULT_TRACE === '1' ? (line: string) => console.log(`[${seed}] ${line}`) : () => undefined;
  const track = (name: string, what: 'create' | 'delete' | 'other', op: Promise<unknown>): void => {
    trace(`${what} ${name} begun`);
    inFlight.push(op.then(() => {
      trace(`${what} ${name} ok`);
      if (what !== 'other') lastAck.set(name, what);
    }, (error: unknown) => {
      const code = error instanceof DaemonError ? error.code : undefined;
      trace(`${what} ${name} failed ${code}: ${(error as Error).message}`);
      if (code === undefined || !EXPECTED_CODES.has(code)) unexpected.push(`${what} ${name}: ${(error as Error).stack ?? String(error)}`);
    }));
  };

  for (let i = 0; i < OPS_PER_SEQUENCE; i++) {
    const name = pick(NAMES);
    const m = w.manager;
    const roll = rnd();
    trace(`op ${i}`);
    if (roll < 0.18) track(name, 'create', m.create(w.spec(name), { start: rnd() < 0.7 }));
    else if (roll < 0.3) track(name, 'other', m.start(name));
    else if (roll < 0.42) track(name, 'other', m.stop(name, { timeoutSec: 0.05 }));
    else if (roll < 0.52) track(name, 'delete', m.delete(name));
    else if (roll < 0.6) track(name, 'other', m.refresh(name, { strategy: pick(['migrate', 'reboot'] as const), timeoutSec: 0.2 }));
    else if (roll < 0.66) track(name, 'other', m.qmp(name, 'query-status'));
    else {
      tally.faults++;
      const qemu = pick(w.host.of(name).concat([]));
      const fault = pick(['restart', 'disk-full', 'disk-free', 'sigstop', 'sigcont', 'kill', 'flood', 'huge', 'switch'] as const);
      trace(`fault ${fault} ${name} (pid ${qemu?.pid})`);
      switch (fault) {
        case 'restart':
          // Operations of the old daemon may still be under way: they must not write.
          await w.restart().catch((error: unknown) => unexpected.push(`restart: ${String(error)}`));
          break;
        case 'disk-full':
          w.fs.full = true;
          break;
        case 'disk-free':
          w.fs.full = false;
          break;
        case 'sigstop':
          qemu?.sigstop();
          break;
        case 'sigcont':
          qemu?.sigcont();
          break;
        case 'kill':
          qemu?.die();
          break;
        case 'flood':
          for (let k = 0; k < 50; k++) qemu?.event(k % 2 === 0 ? 'STOP' : 'RESUME');
          break;
        case 'huge':
          if (qemu) {
            qemu.hugeReplyBytes = 2 * 1024 * 1024;
            track(name, 'other', m.qmp(name, 'human-monitor-command', { 'command-line': 'xp /200000xg 0' }).finally(() => {
              qemu.hugeReplyBytes = 0;
            }));
          }
          break;
        case 'switch':
          w.current = w.current === 'a' ? 'b' : 'a';
          break;
      }
    }
    tally.operations++;
    if (rnd() < 0.3) await new Promise((resolve) => setImmediate(resolve));
  }
  // Settle: every QEMU continued, room on the disk, everything in flight answered, a restart.
  for (const q of w.host.qemus.values()) q.sigcont();
  w.fs.full = false;
  await Promise.all(inFlight);
  await w.restart();
  await settled(w);

  const problems = [...unexpected, ...(await invariantViolations(w, lastAck))];
  tally.sequences++;
  tally.violations += problems.length;
  expect(problems, `seed ${seed}: rerun with VMKEEP_FAULT_SEED=${seed}`).toEqual([]);
}

/** Waits (bounded) until no VM is mid-operation or waiting for a reattach retry. */
async function settled(w: World): Promise<void> {
  const deadline = Date.now() + 5_000;
  for (;;) {
    const vms = await w.manager.list();
    if (vms.every((v) => v.operation === undefined && v.state !== 'unreachable' && v.state !== 'starting')) return;
    if (Date.now() > deadline) return;
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

async function invariantViolations(w: World, lastAck: Map<string, 'create' | 'delete'>): Promise<string[]> {
  const problems: string[] = [];
  const listed = await w.manager.list();
  const names = listed.map((v) => v.name);
  const onDisk = w.fs.names(w.recordsDir);
  if (JSON.stringify(names) !== JSON.stringify(onDisk)) problems.push(`listed ${names.join(',')} but on disk ${onDisk.join(',')}`);
  for (const name of NAMES) {
    const live = w.host.of(name);
    const vm = listed.find((v) => v.name === name);
    if (live.length > 1) problems.push(`${name}: ${live.length} QEMUs run (${live.map((q) => q.pid).join(', ')})`);
    if (live.length > 0 && vm === undefined) problems.push(`${name}: QEMU ${live[0]?.pid} runs without a record`);
    if (vm && (vm.state === 'running' || vm.state === 'paused') && !live.some((q) => q.pid === vm.pid)) {
      problems.push(`${name}: reported ${vm.state} with pid ${vm.pid}, which does not run`);
    }
    if (vm && vm.state === 'unreachable') problems.push(`${name}: still unreachable after every fault was lifted (${vm.problem ?? ''})`);
    if (lastAck.get(name) === 'delete' && vm !== undefined) problems.push(`${name}: an acknowledged delete came back`);
  }
  const scopes = [...w.host.scopes.keys()];
  const claimed = new Set(listed.map((v) => v.scope));
  for (const scope of scopes) if (!claimed.has(scope)) problems.push(`orphan scope ${scope}`);
  return problems;
}

describe('fault harness (fake QEMU)', () => {
  it(`survives ${SEQUENCES} random sequences of operations and faults with every invariant kept`, async () => {
    const only = process.env.VMKEEP_FAULT_SEED;
    const seeds = only === undefined ? Array.from({ length: SEQUENCES }, (_, i) => 1000 + i) : [Number(only)];
    const tally: Tally = { sequences: 0, operations: 0, faults: 0, violations: 0 };
    const began = Date.now();
    for (const seed of seeds) {
      await runSequence(seed, tally);
      await world?.close();
      world = undefined;
    }
    console.log(`fault harness: ${tally.sequences} sequences, ${tally.operations} operations, ${tally.faults} faults, ${tally.violations} invariant violations, ${Date.now() - began} ms`);
  }, 120_000);
});
