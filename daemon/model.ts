import type { DiskChain, VmSpec } from '../launcher/index.js';
import type { RefreshStrategy } from '../upgrade/index.js';
import type { OperationContext, RunAs } from './operations.js';
import type { OperationStatus } from './operation-state.js';
import type { Caller } from './access.js';

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

export const AUTOSTART_MODES = ['always', 'never', 'last-state'] as const;
/** At a host boot: always start; never; last-state: start when it was running as the host went down. */
export type AutostartMode = (typeof AUTOSTART_MODES)[number];
export const DEFAULT_AUTOSTART: AutostartMode = 'last-state';

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
  channel: string;
  /** This VM's own refresh strategy, if it has one (else the daemon's default policy applies). */
  policy?: RefreshStrategy;
  /** Whether a host boot starts it (default last-state). */
  autostart: AutostartMode;
  qemuVersion?: string;
  /** A refresh under way (or left by a crash, to be finished or rolled back). */
  refreshing?: 'migrate' | 'cpr' | 'reboot';
  pid?: number;
  scope?: string;
  /** The TAP devices its running QEMU opened (bridge NICs). */
  taps?: string[];
  /** Bridge NICs cut off from their bridge, as vmkeepd last saw the host's links (nic-repair.ts). */
  nicProblems?: NicProblem[];
  /** Why the daemon cannot talk to this VM (state unreachable), or what failed last. */
  problem?: string;
  lastExit?: ExitInfo;
  /** The operation that holds the VM now (a start, a refresh, the reattach after a restart). */
  operation?: { kind: string; step?: string; since: string; id?: string };
  createdAt: string;
  updatedAt: string;
}

/**
 * A bridge NIC of a running VM whose TAP is not where it belongs. `detached`: off its bridge or
 * down and not (yet) put back; `bridge-missing`: the bridge is gone (put back once it exists);
 * `tap-gone`: the TAP was deleted under the QEMU (only a new QEMU helps).
 */
export interface NicProblem {
  nic: number;
  tap: string;
  bridge: string;
  problem: 'detached' | 'bridge-missing' | 'tap-gone';
  message: string;
  fix: string;
}

export interface DaemonInfo {
  version: string;
  pid: number;
  stateDir: string;
  runtimeDir: string;
  startedAt: string;
  /** Scopes with vmkeep's prefix that no record claims (reported, never touched). */
  orphanScopes: string[];
  /** TAP devices with vmkeep's name pattern that no record claims (reported, never removed). */
  orphanTaps: string[];
  /** Record files that cannot be read: their VMs are left alone and their names stay taken. */
  damagedRecords: Array<{ name: string; file: string; problem: string }>;
}

export const EVENT_TYPES = ['vm-state', 'vm-created', 'vm-deleted', 'vm-power', 'vm-autostart', 'vm-network', 'daemon', 'refresh', 'operation'] as const;
export type DaemonEventType = (typeof EVENT_TYPES)[number];

/** A change the event stream carries, one JSON object per line. */
export interface DaemonEvent {
  type: DaemonEventType;
  vm?: string;
  /** The operation that caused it, if one did (an API request answered 202). */
  operation?: string;
  /** operation events: its VMs and its status now. */
  vms?: string[];
  status?: OperationStatus;
  state?: VmState;
  previous?: VmState;
  message?: string;
  /** refresh events: the rolling refresh's operation id, the step (started, migrating, done, failed, skipped, job-done). */
  job?: string;
  step?: RefreshStep;
  progress?: { done: number; total: number; failed: number };
  outcome?: RefreshOutcome;
  time: string;
}

export type RefreshStep = 'started' | 'migrating' | 'powering-off' | 'starting' | 'done' | 'failed' | 'skipped' | 'pause' | 'job-done';

export interface RefreshOptions {
  /** Default: the VM's own policy, else the daemon's. */
  strategy?: RefreshStrategy;
  /** Seconds for the migration, or for the guest to power off (reboot); DEFAULT_MIGRATE_TIMEOUT_SEC / DEFAULT_REBOOT_TIMEOUT_SEC. */
  timeoutSec?: number;
  /** reboot: quit a guest that ignores ACPI (it loses unwritten data). */
  force?: boolean;
  /** Told of the refresh's steps (for a job's progress). */
  onStep?: (step: RefreshStep, message: string) => void;
}

/** What a refresh did to one VM. */
export interface RefreshOutcome {
  vm: string;
  strategy: RefreshStrategy;
  /** migrated / rebooted: now on the current installation; armed: waits for the guest's own
   *  shutdown; current: nothing to do; reported: manual policy, nothing done. */
  result: 'migrated' | 'rebooted' | 'armed' | 'current' | 'reported';
  from?: { installation: string; version?: string; pid?: number };
  to?: { installation: string; version: string; pid?: number };
  /** migrate, cpr: QEMU's own figure of the guest's pause. */
  downtimeMs?: number;
  /** migrate, cpr: QEMU's own total time of the migration (from its start on the source to completion). */
  migrationMs?: number;
  /** auto or cpr: why this strategy was taken (cpr possible, or what ruled it out). */
  reason?: string;
  /** Wall time of the whole refresh. */
  totalMs: number;
  message: string;
}

export interface RefreshJobRequest {
  /** Exactly one of vms, all, stale. */
  vms?: string[];
  all?: boolean;
  stale?: boolean;
  strategy?: RefreshStrategy;
  parallel?: number;
  timeoutSec?: number;
  force?: boolean;
  /** The same as maxFailures 1. */
  stopOnError?: boolean;
  /** Seconds to pause between batches of `parallel` VMs (0 to MAX_BATCH_INTERVAL_SEC). */
  batchIntervalSec?: number;
  /** Stop the job after this many failed VMs: no new VM is begun, the rest are not attempted. */
  maxFailures?: number;
}

/** A rolling refresh's VMs and how it will run them, decided before it begins. */
export interface RefreshJobPlan {
  vms: string[];
  parallel: number;
  /** 0: a new VM begins as soon as one ends. */
  batchIntervalSec: number;
  /** stopOnError is 1. */
  maxFailures?: number;
  options: Omit<RefreshOptions, 'onStep'>;
}

/** The result of a rolling refresh's operation (its `id` is the operation's). */
export interface RefreshJob {
  id: string;
  vms: string[];
  parallel: number;
  batchIntervalSec?: number;
  maxFailures?: number;
  results: Array<{ vm: string; ok: boolean; skipped?: boolean; outcome?: RefreshOutcome; error?: { code: string; message: string } }>;
}

/** One VM in `upgrade-status`. */
export interface VmUpgradeStatus {
  name: string;
  state: VmState;
  channel: string;
  installation: string;
  runningVersion?: string;
  currentInstallation: string;
  currentVersion: string;
  stale: boolean;
  reasons: string[];
  policy: RefreshStrategy;
  /** What the policy will do, in words. */
  outcome: string;
  refreshing?: 'migrate' | 'cpr' | 'reboot';
  pid?: number;
  exe?: string;
  /** What needs attention beyond staleness, e.g. the running binary is gone from disk. */
  warnings?: string[];
}

export interface UpgradeStatus {
  defaultPolicy: RefreshStrategy;
  channels: Array<{ channel: string; installation: string; binary: string; version: string }>;
  vms: VmUpgradeStatus[];
}

export interface CreateOptions {
  start?: boolean;
  /** Installations channel (default "default"). */
  channel?: string;
  policy?: RefreshStrategy;
  autostart?: AutostartMode;
  /** Who asks (default: the admin): an operator's spec must keep to the storage roots. */
  caller?: Caller;
}

/** Settings of an existing VM that `vmkeep set` changes. */
export interface VmSettings {
  autostart?: AutostartMode;
}

/** Seconds a guest gets to power off after the ACPI request, unless the caller says otherwise. */
export const DEFAULT_STOP_TIMEOUT_SEC = 60;
/** Seconds a live migration may take, unless the caller says otherwise. */
export const DEFAULT_MIGRATE_TIMEOUT_SEC = 60;
/** Seconds a reboot refresh gives the guest to power off, unless the caller says otherwise. */
export const DEFAULT_REBOOT_TIMEOUT_SEC = 120;
/** How long vmkeepd waits for a monitor's greeting before it calls the VM unreachable (retried). */
export const MONITOR_GREETING_TIMEOUT_MS = 3_000;

export interface StopOptions {
  /** Seconds the guest gets to power off after ACPI; default DEFAULT_STOP_TIMEOUT_SEC. */
  timeoutSec?: number;
  /** quit QEMU at once (the guest loses what it had not written). */
  force?: boolean;
  /**
   * The host is shutting down (vmkeep-guests.service): the guest powers off but the VM is still
   * wanted running, so autostart=last-state starts it at the next boot.
   */
  hostShutdown?: boolean;
}

/** What the control API can ask of the daemon; the HTTP layer only translates. */
/** What `vmkeep disk accept` recorded, and what was recorded before (null: nothing yet). */
export interface DiskAcceptResult {
  vm: string;
  previous: DiskChain[] | null;
  disks: DiskChain[];
}

export interface DaemonOps {
  info(): DaemonInfo;
  list(): Promise<VmView[]>;
  get(name: string): Promise<VmView>;
  /** Validates the spec; creates the record; starts the VM unless start is false. */
  create(spec: unknown, options?: CreateOptions): Promise<VmView>;
  /**
   * Refuses at once what an operation would only fail on: an unknown VM (NOT_FOUND), a start or
   * refresh while another user operation holds the VM (BUSY).
   */
  admit(kind: 'start' | 'stop' | 'refresh', name: string): void;
  /** `context`: the operation this runs as (its id marks the VM's lock and the events). */
  start(name: string, runAs?: RunAs): Promise<VmView>;
  stop(name: string, options?: StopOptions, runAs?: RunAs): Promise<VmView>;
  /** Changes settings of an existing VM (autostart). */
  set(name: string, settings: VmSettings): Promise<VmView>;
  /** Only a VM without a running QEMU can be deleted. */
  delete(name: string): Promise<void>;
  /** Operator pass-through: one QMP command on the VM's monitor. */
  qmp(name: string, command: string, args?: Record<string, unknown>): Promise<unknown>;
  /** Path of the VM's serial console log. */
  consolePath(name: string): Promise<string>;
  /** Moves one VM onto the current installation (or reports, or arms, per strategy). */
  /** With a context, a cancel of it cancels a live migration under way (rolled back). */
  refresh(name: string, options?: RefreshOptions, runAs?: RunAs): Promise<RefreshOutcome>;
  /** Checks a rolling refresh's request and resolves its VMs (INVALID_REQUEST, NOT_FOUND). */
  planRefreshJob(request: RefreshJobRequest): Promise<RefreshJobPlan>;
  /** Runs a planned rolling refresh as the operation `context`; a cancel begins no further VM. */
  runRefreshJob(plan: RefreshJobPlan, context: OperationContext): Promise<RefreshJob>;
  upgradeStatus(): Promise<UpgradeStatus>;
  /** GET /1.0/metrics: the Prometheus text format (daemon/metrics.ts). */
  metricsText(): Promise<string>;
  /** Records each disk's backing chain as it is now (after BACKING_CHAIN_CHANGED, once checked). */
  acceptDisks(name: string): Promise<DiskAcceptResult>;
  /** Subscribes to state changes; returns the unsubscribe function. */
  subscribe(listener: (event: DaemonEvent) => void): () => void;
}
