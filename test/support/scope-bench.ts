// Measures ScopeManager.createScope: from the call until the scope's start job is done and the
// PID is verified in the scope's cgroup. Must run in systemd's pid namespace (PIDs are passed as
// this process sees them), e.g. inside a SystemdHost via nsenter.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import type { ScopeManager } from '../../scope-manager/index.js';

export interface CreateScopeBenchOptions {
  /** Number of scopes created one after the other; default 50. */
  count?: number;
  /** Scope names are `<namePrefix><i>.scope`; default `vmkeep-bench-<pid>-`. */
  namePrefix?: string;
  slice?: string;
}

export interface CreateScopeBenchResult {
  count: number;
  medianMs: number;
  p90Ms: number;
  minMs: number;
  maxMs: number;
  samplesMs: number[];
}

function median(sorted: number[]): number {
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 === 1 ? (sorted[mid] ?? NaN) : ((sorted[mid - 1] ?? NaN) + (sorted[mid] ?? NaN)) / 2;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))] ?? NaN;
}

export async function benchCreateScope(manager: ScopeManager, options: CreateScopeBenchOptions = {}): Promise<CreateScopeBenchResult> {
  const count = options.count ?? 50;
  const prefix = options.namePrefix ?? `vmkeep-bench-${process.pid}-`;
  const children: ChildProcess[] = [];
  const samplesMs: number[] = [];
  try {
    // One round trip outside the measurement so the connection set-up is not in the first sample.
    await manager.listScopes(prefix);
    for (let i = 0; i < count; i++) {
      const child = spawn('sleep', ['infinity'], { stdio: 'ignore' });
      children.push(child);
      if (child.pid === undefined) throw new Error('could not spawn sleep');
      const started = performance.now();
      await manager.createScope({ name: `${prefix}${i}.scope`, pids: [child.pid], slice: options.slice });
      samplesMs.push(performance.now() - started);
    }
  } finally {
    for (const child of children) {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill('SIGKILL');
        await once(child, 'exit');
      }
    }
    // Empty scopes are collected by systemd (CollectMode=inactive-or-failed).
    for (let i = 0; i < children.length; i++) await manager.waitScopeGone(`${prefix}${i}.scope`, 10_000);
  }
  const sorted = [...samplesMs].sort((a, b) => a - b);
  const round = (ms: number): number => Math.round(ms * 100) / 100;
  return {
    count,
    medianMs: round(median(sorted)),
    p90Ms: round(percentile(sorted, 0.9)),
    minMs: round(sorted[0] ?? NaN),
    maxMs: round(sorted[sorted.length - 1] ?? NaN),
    samplesMs: samplesMs.map(round),
  };
}
