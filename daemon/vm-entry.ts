// One VM in the daemon's memory, and the small pure helpers every part of the manager shares.
import type { ExeInfo, InstallationInfo } from '../launcher/index.js';
import type { QmpClient } from '../qmp/index.js';
import { DEFAULT_AUTOSTART, type NicProblem, type VmState, type VmView } from './model.js';
import { OperationLock } from './operation-lock.js';
import type { QemuPort } from './ports.js';
import type { OtherQemu, VmRecord } from './records.js';

/** One VM in memory: its record (the truth on disk), its monitor, and its operation lock. */
export interface VmEntry {
  record: VmRecord;
  qmp?: QmpClient;
  lock: OperationLock;
  /** Set while the daemon itself ends this QEMU, so its exit is not taken for a crash. */
  stopping?: string;
  retryTimer?: NodeJS.Timeout;
  /** Reason of a host-side SHUTDOWN event (e.g. host-signal) seen before the monitor closed. */
  hostShutdown?: string;
  /** An operator's stop asked this QEMU's guest to power off (kept after a stop timeout). */
  stopAsked?: boolean;
  /** That stop was the host's shutdown (vmkeep-guests.service): the VM stays wanted running. */
  hostShutdownStop?: boolean;
  /** What memory knows and the disk does not yet (the last write failed): retried. */
  unsaved?: string;
  /** The monitor did not answer the last health check. */
  hung?: boolean;
  /** Its bridge NICs' problems as the last look at the host's links found them (nic-repair.ts). */
  nicProblems?: NicProblem[];
}

export function newEntry(record: VmRecord): VmEntry {
  return { record, lock: new OperationLock(record.name) };
}

const PROBLEM_MAX_CHARS = 500;

/** Problems come from QEMU and from peers: bounded before they go into a record. */
export function truncate(text: string): string {
  return text.length > PROBLEM_MAX_CHARS ? `${text.slice(0, PROBLEM_MAX_CHARS)}…` : text;
}

/** The binary of the VM's recorded QEMU, only while that PID is still that process (ARCHITECTURE.md, invariant 7). */
export async function exeOf(qemu: QemuPort, record: VmRecord, current?: { dev: number; ino: number }): Promise<ExeInfo | null> {
  const proc = record.process;
  return proc === undefined ? null : qemu.exe(proc.pid, proc.startTime, current);
}

export function binaryOf(info: InstallationInfo, moduleDir: string | undefined): NonNullable<VmRecord['binary']> {
  return { ...info.identity, version: info.version, ...(moduleDir === undefined ? {} : { moduleDir }) };
}

/** The VM's current QEMU as the retired source of a finished migration. */
export function retiredOf(record: VmRecord): OtherQemu {
  const proc = record.process as NonNullable<VmRecord['process']>;
  return { ...proc, qmpSocket: record.paths.qmpSocket, ...(record.binary?.moduleDir ? { moduleDir: record.binary.moduleDir } : {}) };
}

export function toView(entry: VmEntry): VmView {
  const { record } = entry;
  const view: VmView = {
    name: record.name,
    state: record.state as VmState,
    spec: record.spec,
    uuid: record.uuid,
    machineType: record.machineType,
    installation: record.installation.name,
    channel: record.channel,
    autostart: record.autostart ?? DEFAULT_AUTOSTART,
    createdAt: record.createdAt,
    updatedAt: record.updatedAt,
  };
  if (record.binary) view.qemuVersion = record.binary.version;
  if (record.policy) view.policy = record.policy;
  if (record.refresh) view.refreshing = record.refresh.strategy;
  if (record.process) {
    view.pid = record.process.pid;
    if (record.process.scope) view.scope = record.process.scope;
    if (record.process.taps) view.taps = record.process.taps;
    // Only this QEMU's TAPs: a problem of a QEMU a refresh replaced is no longer true.
    const taps = record.process.taps ?? [];
    const nicProblems = (entry.nicProblems ?? []).filter((p) => taps.includes(p.tap));
    if (nicProblems.length > 0) view.nicProblems = nicProblems;
  }
  const problems = [
    record.problem,
    entry.unsaved === undefined ? undefined : `this state is not on disk yet (${entry.unsaved}); vmkeepd retries the write`,
  ].filter((p): p is string => p !== undefined);
  if (problems.length > 0) view.problem = problems.join('; ');
  if (record.lastExit) view.lastExit = record.lastExit;
  const op = entry.lock.current;
  if (op && op.kind !== 'supervise') view.operation = { kind: op.kind, ...(op.step ? { step: op.step } : {}), since: op.since, ...(op.operation ? { id: op.operation } : {}) };
  return view;
}
