import type { VmSpec } from '../launcher/index.js';

/**
 * Where a VM stands, as the daemon reports it.
 * - starting: a QEMU is being started (record written before the spawn)
 * - running / paused: QEMU alive, monitor connected, status read
 * - shutdown: the guest powered off; QEMU (-no-shutdown) still waits for the daemon
 * - stopped: no QEMU, by request or after a guest power-off was finished
 * - exited: the QEMU ended without being asked (crash, kill, exit while the daemon was away)
 * - unreachable: the process is alive but its monitor does not answer (never killed)
 */
export type VmState = 'starting' | 'running' | 'paused' | 'shutdown' | 'stopped' | 'exited' | 'unreachable';

/** How the last QEMU of a VM ended. */
export interface ExitInfo {
  /** e.g. "guest shutdown", "stopped by request", "exited while away", "unknown" */
  reason: string;
  at: string;
}

/** One VM as the API shows it. */
export interface VmView {
  name: string;
  state: VmState;
  spec: VmSpec;
  uuid: string;
  machineType: string;
  installation: string;
  qemuVersion?: string;
  pid?: number;
  scope?: string;
  /** Why the daemon cannot talk to this VM (state unreachable), or what failed last. */
  problem?: string;
  lastExit?: ExitInfo;
  createdAt: string;
  updatedAt: string;
}

export interface DaemonInfo {
  version: string;
  pid: number;
  stateDir: string;
  runtimeDir: string;
  startedAt: string;
  /** Scopes with vmkeep's prefix that no record claims (reported, never touched). */
  orphanScopes: string[];
}

/** A change the event stream carries, one JSON object per line. */
export interface DaemonEvent {
  type: 'vm-state' | 'vm-created' | 'vm-deleted' | 'daemon';
  vm?: string;
  state?: VmState;
  previous?: VmState;
  message?: string;
  time: string;
}

export interface StopOptions {
  /** Seconds the guest gets to power off after ACPI; default 60. */
  timeoutSec?: number;
  /** quit QEMU at once (the guest loses what it had not written). */
  force?: boolean;
}

/** What the control API can ask of the daemon; the HTTP layer only translates. */
export interface DaemonOps {
  info(): DaemonInfo;
  list(): Promise<VmView[]>;
  get(name: string): Promise<VmView>;
  /** Validates the spec; creates the record; starts the VM unless start is false. */
  create(spec: unknown, options?: { start?: boolean }): Promise<VmView>;
  start(name: string): Promise<VmView>;
  stop(name: string, options?: StopOptions): Promise<VmView>;
  /** Only a VM without a running QEMU can be deleted. */
  delete(name: string): Promise<void>;
  /** Operator pass-through: one QMP command on the VM's monitor. */
  qmp(name: string, command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** Path of the VM's serial console log. */
  consolePath(name: string): Promise<string>;
  /** Subscribes to state changes; returns the unsubscribe function. */
  subscribe(listener: (event: DaemonEvent) => void): () => void;
}
