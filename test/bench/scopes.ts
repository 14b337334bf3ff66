// Benchmarks 3 and 4, inside one private systemd: scope creation alone, and a VM start with
// and without its scope. The work runs inside (scope PIDs are those of its pid namespace).
import { join } from 'node:path';
import type { GuestImage } from '../support/guest.js';
import { requireQemu } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import type { CreateScopeBenchResult } from '../support/scope-bench.js';
import { requireSystemdHostPrereqs, SystemdHost } from '../support/systemd-host.js';
import { log, met, type Cleanup, type Section } from './common.js';
import { formatMs, median, percentile } from './stats.js';

const SCOPE_DRIVER = join(projectRoot(), 'dist', 'test', 'support', 'scope-driver.js');
const START_DRIVER = join(projectRoot(), 'dist', 'test', 'bench', 'start-driver.js');
const SCOPE_COUNT = 200;
const START_PAIRS = 20;
const TARGET_SCOPE_MS = 25;

/** Runs a compiled driver inside the host; returns its `result` or throws its error. */
async function runDriver<T>(host: SystemdHost, script: string, input: unknown, timeoutMs: number): Promise<T> {
  const r = await host.exec(process.execPath, [script, JSON.stringify(input)], { timeoutMs });
  const last = r.stdout.trim().split('\n').at(-1) ?? '';
  let reply: { ok: boolean; result?: T; error?: unknown };
  try {
    reply = JSON.parse(last) as typeof reply;
  } catch {
    throw new Error(`${script} inside ${host.name} printed no JSON (exit ${r.exitCode ?? r.signal}):\n${r.stdout}\n${r.stderr}`);
  }
  if (!reply.ok) throw new Error(`${script} inside ${host.name} failed: ${JSON.stringify(reply.error)}\n${r.stderr}`);
  return reply.result as T;
}

export async function bootBenchHost(cleanup: Cleanup): Promise<SystemdHost> {
  requireSystemdHostPrereqs();
  const host = await SystemdHost.boot({ name: `bench-${process.pid}` });
  cleanup.add(`private systemd ${host.name}`, () => host.shutdown());
  return host;
}

export async function benchScopeCreation(host: SystemdHost): Promise<Section> {
  log(`scopes: creating ${SCOPE_COUNT} scopes one after the other inside ${host.name}`);
  const r = await runDriver<CreateScopeBenchResult>(host, SCOPE_DRIVER, { op: 'bench', count: SCOPE_COUNT }, 120_000);
  const med = median(r.samplesMs);
  const p99 = percentile(r.samplesMs, 0.99);
  log(`scopes: median ${formatMs(med)}, p99 ${formatMs(p99)}`);
  return {
    title: '3. Scope creation',
    rows: [{
      what: 'ScopeManager.createScope until the job is done and the PID verified in the scope',
      n: r.samplesMs.length,
      median: formatMs(med),
      p99: formatMs(p99),
      target: `part of "scope adds < ${TARGET_SCOPE_MS} ms per VM"`,
      met: met(med < TARGET_SCOPE_MS),
    }],
    notes: [
      'Inside a private systemd 252 (test/support/systemd-host.ts), over D-Bus with dbus-next; one `sleep` moved per scope ' +
        '(test/support/scope-bench.ts). "met" compares the median with the per-VM budget; benchmark 4 is the end-to-end check.',
    ],
  };
}

export async function benchStartWithScope(host: SystemdHost, ctx: { guest: GuestImage; workDir: string }): Promise<Section> {
  log(`start with/without scope: ${START_PAIRS} alternating pairs inside ${host.name}`);
  const r = await runDriver<{ withoutMs: number[]; withMs: number[] }>(host, START_DRIVER, {
    qemu: requireQemu(),
    kernel: ctx.guest.kernel,
    initrd: ctx.guest.initrd,
    append: ctx.guest.append,
    workDir: ctx.workDir,
    pairs: START_PAIRS,
  }, 180_000);
  const diffs = r.withMs.map((x, i) => x - (r.withoutMs[i] ?? NaN));
  const added = median(diffs);
  log(`start with/without scope: without ${formatMs(median(r.withoutMs))}, with ${formatMs(median(r.withMs))}, added ${formatMs(added)}`);
  return {
    title: '4. VM start with scope vs without',
    rows: [
      { what: 'launchVm (paused) to QMP ready, without a scope', n: r.withoutMs.length, median: formatMs(median(r.withoutMs)), p99: '—', target: '', met: '—' },
      { what: 'the same with placeInScope (ScopeManager.createScope)', n: r.withMs.length, median: formatMs(median(r.withMs)), p99: '—', target: '', met: '—' },
      { what: 'added by the scope: median of per-pair differences', n: diffs.length, median: formatMs(added), p99: '—', target: `< ${TARGET_SCOPE_MS} ms`, met: met(added < TARGET_SCOPE_MS) },
    ],
    notes: [
      'Driver test/bench/start-driver.ts runs inside the private systemd; alternating without/with after one untimed start of each. ' +
        "Each sample checks /proc/PID/cgroup, so a 'with' sample really is in its scope.",
      `Per pair (ms, without/with): ${r.withoutMs.map((x, i) => `${Math.round(x)}/${Math.round(r.withMs[i] ?? NaN)}`).join(', ')}.`,
    ],
  };
}
