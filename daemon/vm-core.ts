// What the parts of the VM manager (supervision, reattach, migration, refresh jobs, upgrade
// status) may ask of it. The manager implements it; the parts import only this type, so the
// dependencies inside daemon/ point one way (ARCHITECTURE.md, "daemon/").
import type { Logger } from './log.js';
import type { Installation, InstallationInfo, LaunchedVm, LaunchVmOptions, QemuUser } from '../launcher/index.js';
import type { QmpClient } from '../qmp/index.js';
import type { InstallationsConfig, RefreshStrategy } from '../upgrade/index.js';
import type { DaemonEvent } from './model.js';
import type { QemuPort, ScopePort } from './ports.js';
import type { RecordStore, VmRecord } from './records.js';
import type { NetPort, TapKeeper } from './taps.js';
import type { VmEntry } from './vm-entry.js';

export interface CoreOptions {
  store: RecordStore;
  scopes: ScopePort | null;
  qemu: QemuPort;
  slice: string;
  installations: InstallationsConfig;
  defaultPolicy: RefreshStrategy;
  pinRoot: string;
  guestsUnit: string;
  crashAt?: string;
  probe: (installation: Installation) => Promise<InstallationInfo>;
  runtimeDir: string;
  /** --storage-root folders, absolute, as configured (ARCHITECTURE.md, invariant 11). */
  storageRoots?: readonly string[];
  /** The user every QEMU runs as (ARCHITECTURE.md, invariant 11); absent: vmkeepd's own. */
  qemuUser?: QemuUser;
  logger: Logger;
  greetingTimeoutMs: number;
  retryIntervalMs: number;
  /** How often each monitor is asked whether it still answers (0: never). */
  healthIntervalMs: number;
  net: NetPort;
  /** Makes and removes the VMs' TAP devices, one change at a time. */
  taps: TapKeeper;
}

export interface LaunchArgs {
  installation: Installation;
  info: InstallationInfo;
  paths: VmRecord['paths'];
  scope: string | null;
  incoming: boolean;
  /** The TAP of each bridge NIC for this QEMU (tapsForNewQemu), made before it starts. */
  taps: ReadonlyArray<string | undefined>;
  /** false: user-mode NICs start without host forwards (a destination gets them at hand-over). */
  withForwards: boolean;
  onSpawned: (proc: NonNullable<VmRecord['process']>, moduleDir: string | undefined) => Promise<void>;
}

/** How a QEMU is started: QemuPort.launch by default; a cpr-transfer destination has its own. */
export type Launch<T> = (options: LaunchVmOptions) => Promise<T>;

export interface VmCore {
  readonly options: CoreOptions;
  readonly isClosed: boolean;
  entries(): VmEntry[];
  /** An intent (written before it is acted on): disk first, then memory; throws, memory unchanged. */
  record(entry: VmEntry, next: VmRecord): Promise<void>;
  /** A fact (what QEMU did): memory first, then disk; a failed write is retried, never thrown. */
  observe(entry: VmEntry, next: VmRecord): Promise<void>;
  watch(entry: VmEntry, qmp: QmpClient): void;
  detach(entry: VmEntry): void;
  connect(socketPath: string): Promise<QmpClient>;
  launchQemu(entry: VmEntry, args: LaunchArgs): Promise<{ vm: LaunchedVm; moduleDir: string | undefined }>;
  launchQemu<T extends { pid: number }>(entry: VmEntry, args: LaunchArgs, launch: Launch<T>): Promise<{ vm: T; moduleDir: string | undefined }>;
  startNow(entry: VmEntry): Promise<void>;
  endQemu(entry: VmEntry, reason: string): Promise<void>;
  finishGuestShutdown(entry: VmEntry, reason?: string): Promise<void>;
  armGuestReboots(entry: VmEntry): Promise<void>;
  scheduleRetry(entry: VmEntry): void;
  crashPoint(step: string): void;
  policyOf(record: VmRecord): RefreshStrategy;
  current(record: VmRecord): Installation;
  vmDir(name: string): string;
  emit(event: Omit<DaemonEvent, 'time'>): void;
}
