import { randomBytes } from 'node:crypto';
import { constants } from 'node:fs';
import { chmod, mkdir, open, readdir, rename, unlink } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import {
  describeValue, isLowercaseUuid, SIMPLE_NAME_RE, TAP_NAME_RE, VM_NAME_RULE,
  isValidVmName, LaunchError, validateSpec, type BinaryIdentity, type DiskChain, type DiskLayer, type Installation, type VmSpec,
} from '../launcher/index.js';
import { isRecord } from '../qmp/index.js';
import { DEFAULT_CHANNEL, REFRESH_STRATEGIES, type RefreshStrategy } from '../upgrade/index.js';
import { DaemonError } from './errors.js';
import { AUTOSTART_MODES, type AutostartMode, type ExitInfo, type VmState } from './model.js';

/**
 * Version of the record format this daemon writes. Any change of shape (even a new optional
 * field) bumps it and adds an entry to RECORD_UPGRADES, so older daemons refuse what they
 * cannot fully read instead of silently dropping fields on their next write.
 */
export const RECORD_SCHEMA = 6;

/** A record is a spec plus a few paths (well under 1 MiB); a larger file is not one of ours. */
const RECORD_MAX_BYTES = 4 * 1024 * 1024;

/** A QEMU of the VM other than the one it runs on: a migration's destination or retired source. */
export interface OtherQemu {
  pid: number;
  startTime: string;
  scope: string | null;
  qmpSocket: string;
  /** Its pinned module folder (kept while it lives). */
  moduleDir?: string;
  /** The TAP devices it opened (bridge NICs), removed once it is gone. */
  taps?: string[];
}

/**
 * A refresh under way, written before its first step, so a daemon that crashed mid-way finishes
 * or rolls it back. `destination` is set once a migration's new QEMU exists.
 */
export interface RefreshInFlight {
  strategy: 'migrate' | 'cpr' | 'reboot';
  target: Installation;
  startedAt: string;
  destination?: OtherQemu;
}

/** The per-VM durable record, `<stateDir>/vms/<name>.json`. */
export interface VmRecord {
  schema: typeof RECORD_SCHEMA;
  name: string;
  uuid: string;
  /** The validated spec. */
  spec: VmSpec;
  /**
   * Each disk's backing chain as read at create or last accepted (aligned with spec.disks),
   * compared with the files before every QEMU start (ARCHITECTURE.md, "Disks and passed
   * descriptors"). Absent on a record from before chains were recorded: its disks are refused
   * until `vmkeep disk accept`.
   */
  disks?: DiskChain[];
  /** Resolved, versioned machine type, pinned for the VM's life (migration needs the same one). */
  machineType: string;
  /** The installation the VM was started on. */
  installation: Installation;
  /** Which installation is current for this VM (installations file, "current"). */
  channel: string;
  /** This VM's refresh strategy; absent: the daemon's default policy. */
  policy?: RefreshStrategy;
  /** Whether a host boot starts it; absent: last-state. */
  autostart?: AutostartMode;
  /**
   * What the operator (start, stop) or the guest (its own power-off) last chose. A power-off at
   * host shutdown leaves it as it was: that is what last-state reads at the next boot.
   */
  wanted?: 'running' | 'stopped';
  /** Identity of the running QEMU's binary at launch, and the module folder pinned for it. */
  binary?: BinaryIdentity & { version: string; moduleDir?: string };
  refresh?: RefreshInFlight;
  /** The source of a finished migration, to be quit (it waits in postmigrate, guest-less). */
  retired?: OtherQemu;
  /** The current QEMU, if any. */
  process?: { pid: number; startTime: string; scope: string | null; taps?: string[] };
  paths: { qmpSocket: string; serialLog: string; stderrLog: string };
  /** The last state the daemon wrote. */
  state: VmState;
  lastExit?: ExitInfo;
  problem?: string;
  createdAt: string;
  updatedAt: string;
}

/** Turns a record of schema N into one of schema N + 1 (the machinery sets `schema`). */
export type RecordUpgrade = (raw: Record<string, unknown>) => Record<string, unknown>;
/** `upgrades[n]` upgrades schema n to n + 1. */
export type RecordUpgrades = Readonly<Record<number, RecordUpgrade>>;

export const RECORD_UPGRADES: RecordUpgrades = {
  // Schema 2 (upgrades): every VM has a channel; schema 1 knew only one installation.
  1: (raw) => ({ ...raw, channel: DEFAULT_CHANNEL }),
  // Schema 3 (host boot): optional autostart and wanted; absent means last-state, not known.
  2: (raw) => raw,
  // Schema 4 (disks): optional recorded chains. None is read here (pure): a VM with disks has
  // its chain accepted by the operator (vmkeep disk accept) before its next QEMU start.
  3: (raw) => raw,
  // Schema 5 (NICs): optional spec.nics and the TAPs of each QEMU; older records have neither.
  4: (raw) => raw,
  // Schema 6 (restricted user-mode NICs): optional spec.nics[].restrict; absent reads as not
  // restricted, as those QEMUs ran. An older daemon must refuse it, not start the NIC open.
  5: (raw) => raw,
};

/**
 * The schema a record is written with: the lowest whose readers understand every field it holds,
 * so a downgrade (a snap revert, an older .deb) keeps every VM that uses nothing newer
 * (ARCHITECTURE.md, invariant 6). Pure.
 */
export function schemaToWrite(record: Pick<VmRecord, 'spec'>): number {
  // Schema 6 only adds spec.nics[].restrict; an older daemon must refuse a record with it,
  // not start the NIC open.
  return (record.spec.nics ?? []).some((nic) => nic.mode === 'user' && nic.restrict !== undefined) ? 6 : 5;
}

/** Where the records of a state folder live. */
export function recordsDir(stateDir: string): string {
  return join(stateDir, 'vms');
}

// ---------------------------------------------------------------------------------------------
// Parsing (pure)

type Obj = Record<string, unknown>;

const VM_STATES: readonly VmState[] = ['starting', 'running', 'paused', 'shutdown', 'stopped', 'exited', 'unreachable'];
const RECORD_FIELDS = [
  'schema', 'name', 'uuid', 'spec', 'disks', 'machineType', 'installation', 'channel', 'policy', 'autostart', 'wanted', 'binary', 'refresh', 'retired',
  'process', 'paths', 'state', 'lastExit', 'problem', 'createdAt', 'updatedAt',
] as const;

/**
 * Parses and validates one record file's text. `fileName` is the file's path (or base name):
 * the record's name must match it, and errors name it. Older schemas are upgraded through
 * `upgrades`; a newer schema is refused with RECORD_TOO_NEW, anything malformed with
 * RECORD_CORRUPT naming every bad field.
 */
export function parseRecord(text: string, fileName: string, upgrades: RecordUpgrades = RECORD_UPGRADES): VmRecord {
  if (text.length > RECORD_MAX_BYTES) throw corrupt(fileName, [`is larger than ${RECORD_MAX_BYTES} bytes`]);
  if (text.trim() === '') throw corrupt(fileName, ['is empty']);
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (err) {
    throw corrupt(fileName, [`is not complete JSON (${(err as Error).message})`], err);
  }
  const current = upgradeRecord(raw, upgrades, fileName);
  const problems: string[] = [];
  const record = checkRecord(current, nameFromFile(fileName), problems);
  if (record === undefined || problems.length > 0) throw corrupt(fileName, problems);
  return record;
}

/**
 * Brings a parsed record of any known schema up to RECORD_SCHEMA, one step at a time.
 * Returns the still unvalidated object; refuses a newer schema (RECORD_TOO_NEW) and a schema
 * that no upgrade leads from (RECORD_CORRUPT).
 */
export function upgradeRecord(raw: unknown, upgrades: RecordUpgrades, fileName = 'record'): Obj {
  if (!isRecord(raw)) throw corrupt(fileName, [`must hold a JSON object, holds ${describe(raw)}`]);
  const schema = raw.schema;
  if (typeof schema !== 'number' || !Number.isSafeInteger(schema) || schema < 0) {
    throw corrupt(fileName, [`field "schema" must be a whole number >= 0, got ${describe(schema)}`]);
  }
  if (schema > RECORD_SCHEMA) {
    throw new DaemonError('RECORD_TOO_NEW',
      `record ${fileName} was written by a newer vmkeepd (schema ${schema}, this one reads up to ${RECORD_SCHEMA}): `
      + 'upgrade vmkeep to that release again, or restore the record from a backup made before the upgrade; '
      + 'this VM is left alone (its QEMU, if any, keeps running) and the file is not changed');
  }
  let current: Obj = raw;
  for (let from = schema; from < RECORD_SCHEMA; from++) {
    const upgrade = upgrades[from];
    if (upgrade === undefined) {
      throw corrupt(fileName, [`has schema ${from}, which this vmkeepd cannot upgrade (no upgrade from schema ${from} to ${from + 1})`]);
    }
    let next: Obj;
    try {
      next = upgrade(structuredClone(current));
    } catch (err) {
      throw corrupt(fileName, [`could not be upgraded from schema ${from} to ${from + 1} (${(err as Error).message})`], err);
    }
    if (!isRecord(next)) throw corrupt(fileName, [`the upgrade from schema ${from} returned ${describe(next)}`]);
    current = { ...next, schema: from + 1 };
  }
  return current;
}

/** The VM name a record file stands for: its base name without `.json`. */
function nameFromFile(fileName: string): string {
  const base = basename(fileName);
  return base.endsWith('.json') ? base.slice(0, -'.json'.length) : base;
}

function corrupt(fileName: string, problems: readonly string[], cause?: unknown): DaemonError {
  return new DaemonError('RECORD_CORRUPT',
    `record file ${fileName} is damaged: ${problems.join('; ')}. `
    + 'vmkeepd leaves this VM alone (its QEMU, if any, keeps running) and never rewrites or deletes the file: '
    + 'inspect it, fix or restore it from a backup, or move it out of the folder to make vmkeepd forget the VM',
    cause === undefined ? undefined : { cause });
}

/**
 * Checks every field of a current-schema record and returns a fresh object holding only
 * known fields (optional ones absent, never undefined). Problems go to `problems`.
 */
function checkRecord(raw: Obj, expectedName: string, problems: string[]): VmRecord | undefined {
  const bad = (field: string, message: string): void => {
    problems.push(`field "${field}" ${message}`);
  };
  for (const key of Object.keys(raw)) {
    if (!(RECORD_FIELDS as readonly string[]).includes(key)) bad(key, 'is not a known field');
  }
  if (raw.schema !== RECORD_SCHEMA) bad('schema', `must be ${RECORD_SCHEMA}, got ${describe(raw.schema)}`);

  const name = str(raw.name, 'name', bad);
  if (name !== undefined) {
    if (!isValidVmName(name)) bad('name', `${JSON.stringify(name)} is not a valid VM name`);
    else if (name !== expectedName) bad('name', `is ${JSON.stringify(name)} but the file is named ${expectedName}.json`);
  }
  const uuid = str(raw.uuid, 'uuid', bad);
  if (uuid !== undefined && !isLowercaseUuid(uuid)) bad('uuid', `${JSON.stringify(uuid)} is not a lowercase UUID`);

  const spec = checkSpec(raw.spec, bad);
  if (spec !== undefined && name !== undefined && spec.name !== name) {
    bad('spec.name', `is ${JSON.stringify(spec.name)} but the record is for ${JSON.stringify(name)}`);
  }
  const disks = raw.disks === undefined ? undefined : checkDiskChains(raw.disks, spec, bad);
  const machineType = str(raw.machineType, 'machineType', bad);
  if (machineType !== undefined && !SIMPLE_NAME_RE.test(machineType)) {
    bad('machineType', `${JSON.stringify(machineType)} is not a machine type name`);
  }
  const installation = checkInstallation(raw.installation, 'installation', bad);
  const channel = str(raw.channel, 'channel', bad);
  if (channel !== undefined && !SIMPLE_NAME_RE.test(channel)) bad('channel', `${JSON.stringify(channel)} is not a channel name`);
  let policy: RefreshStrategy | undefined;
  if (raw.policy !== undefined) {
    if ((REFRESH_STRATEGIES as readonly unknown[]).includes(raw.policy)) policy = raw.policy as RefreshStrategy;
    else bad('policy', `must be one of ${REFRESH_STRATEGIES.join(', ')}, got ${describe(raw.policy)}`);
  }
  let autostart: AutostartMode | undefined;
  if (raw.autostart !== undefined) {
    if ((AUTOSTART_MODES as readonly unknown[]).includes(raw.autostart)) autostart = raw.autostart as AutostartMode;
    else bad('autostart', `must be one of ${AUTOSTART_MODES.join(', ')}, got ${describe(raw.autostart)}`);
  }
  let wanted: VmRecord['wanted'];
  if (raw.wanted !== undefined) {
    if (raw.wanted === 'running' || raw.wanted === 'stopped') wanted = raw.wanted;
    else bad('wanted', `must be running or stopped, got ${describe(raw.wanted)}`);
  }
  const binary = raw.binary === undefined ? undefined : checkBinary(raw.binary, bad);
  const refresh = raw.refresh === undefined ? undefined : checkRefresh(raw.refresh, bad);
  const retired = raw.retired === undefined ? undefined : checkOtherQemu(raw.retired, 'retired', bad);
  const proc = raw.process === undefined ? undefined : checkProcess(raw.process, bad);
  const paths = checkPaths(raw.paths, bad);
  const state = raw.state;
  if (!VM_STATES.includes(state as VmState)) bad('state', `must be one of ${VM_STATES.join(', ')}, got ${describe(state)}`);
  const lastExit = raw.lastExit === undefined ? undefined : checkExit(raw.lastExit, bad);
  const problem = raw.problem === undefined ? undefined : str(raw.problem, 'problem', bad);
  const createdAt = timestamp(raw.createdAt, 'createdAt', bad);
  const updatedAt = timestamp(raw.updatedAt, 'updatedAt', bad);

  if (problems.length > 0 || name === undefined || uuid === undefined || spec === undefined || machineType === undefined
    || installation === undefined || channel === undefined || paths === undefined || createdAt === undefined
    || updatedAt === undefined) {
    return undefined;
  }
  const record: VmRecord = {
    schema: RECORD_SCHEMA, name, uuid, spec, machineType, installation, channel, paths, state: state as VmState, createdAt, updatedAt,
  };
  if (disks !== undefined) record.disks = disks;
  if (policy !== undefined) record.policy = policy;
  if (autostart !== undefined) record.autostart = autostart;
  if (wanted !== undefined) record.wanted = wanted;
  if (binary !== undefined) record.binary = binary;
  if (refresh !== undefined) record.refresh = refresh;
  if (retired !== undefined) record.retired = retired;
  if (proc !== undefined) record.process = proc;
  if (lastExit !== undefined) record.lastExit = lastExit;
  if (problem !== undefined) record.problem = problem;
  return record;
}

type Bad = (field: string, message: string) => void;

function checkSpec(value: unknown, bad: Bad): VmSpec | undefined {
  if (!isRecord(value)) {
    bad('spec', `must be an object, got ${describe(value)}`);
    return undefined;
  }
  try {
    return validateSpec(value);
  } catch (err) {
    if (!(err instanceof LaunchError)) throw err;
    for (const p of err.problems) bad(`spec.${p.field}`, p.message);
    if (err.problems.length === 0) bad('spec', err.message);
    return undefined;
  }
}

function checkDiskChains(value: unknown, spec: VmSpec | undefined, bad: Bad): DiskChain[] | undefined {
  if (!Array.isArray(value)) {
    bad('disks', `must be an array of chains, got ${describe(value)}`);
    return undefined;
  }
  if (spec !== undefined && value.length !== spec.disks.length) bad('disks', `has ${value.length} chains for ${spec.disks.length} disks in the spec`);
  const chains = value.map((chain: unknown, d) => {
    if (!Array.isArray(chain) || chain.length === 0) {
      bad(`disks[${d}]`, `must be a non-empty array of layers, got ${describe(chain)}`);
      return undefined;
    }
    const layers = chain.map((layer: unknown, l) => checkLayer(layer, `disks[${d}][${l}]`, bad));
    return layers.every((x): x is DiskLayer => x !== undefined) ? layers : undefined;
  });
  return chains.every((c): c is DiskChain => c !== undefined) ? chains : undefined;
}

function checkLayer(value: unknown, field: string, bad: Bad): DiskLayer | undefined {
  const obj = object(value, field, ['path', 'format', 'virtualSize', 'dev', 'ino'], bad);
  if (obj === undefined) return undefined;
  const path = absPath(obj.path, `${field}.path`, bad);
  const format = obj.format;
  if (format !== 'raw' && format !== 'qcow2') bad(`${field}.format`, `must be raw or qcow2, got ${describe(format)}`);
  const virtualSize = count(obj.virtualSize, `${field}.virtualSize`, bad);
  const dev = count(obj.dev, `${field}.dev`, bad);
  const ino = count(obj.ino, `${field}.ino`, bad);
  if (path === undefined || (format !== 'raw' && format !== 'qcow2') || virtualSize === undefined || dev === undefined || ino === undefined) return undefined;
  return { path, format, virtualSize, dev, ino };
}

function checkInstallation(value: unknown, field: string, bad: Bad): Installation | undefined {
  const obj = object(value, field, ['name', 'binary', 'moduleDir', 'firmwareDirs'], bad);
  if (obj === undefined) return undefined;
  const name = str(obj.name, `${field}.name`, bad);
  const binary = absPath(obj.binary, `${field}.binary`, bad);
  const moduleDir = obj.moduleDir === undefined ? undefined : absPath(obj.moduleDir, `${field}.moduleDir`, bad);
  let firmwareDirs: string[] | undefined;
  if (!Array.isArray(obj.firmwareDirs)) {
    bad(`${field}.firmwareDirs`, `must be an array of paths, got ${describe(obj.firmwareDirs)}`);
  } else {
    const dirs = obj.firmwareDirs.map((d: unknown, i) => absPath(d, `${field}.firmwareDirs[${i}]`, bad));
    if (dirs.every((d): d is string => d !== undefined)) firmwareDirs = dirs;
  }
  if (name === undefined || binary === undefined || firmwareDirs === undefined) return undefined;
  const inst: Installation = { name, binary, firmwareDirs };
  if (moduleDir !== undefined) inst.moduleDir = moduleDir;
  return inst;
}

function checkBinary(value: unknown, bad: Bad): VmRecord['binary'] {
  const obj = object(value, 'binary', ['path', 'dev', 'ino', 'size', 'mtimeMs', 'version', 'moduleDir'], bad);
  if (obj === undefined) return undefined;
  const path = absPath(obj.path, 'binary.path', bad);
  const dev = count(obj.dev, 'binary.dev', bad);
  const ino = count(obj.ino, 'binary.ino', bad);
  const size = count(obj.size, 'binary.size', bad);
  const mtimeMs = obj.mtimeMs;
  if (typeof mtimeMs !== 'number' || !Number.isFinite(mtimeMs)) bad('binary.mtimeMs', `must be a number, got ${describe(mtimeMs)}`);
  const version = str(obj.version, 'binary.version', bad);
  const moduleDir = obj.moduleDir === undefined ? undefined : absPath(obj.moduleDir, 'binary.moduleDir', bad);
  if (path === undefined || dev === undefined || ino === undefined || size === undefined || version === undefined
    || typeof mtimeMs !== 'number' || !Number.isFinite(mtimeMs)) return undefined;
  return { path, dev, ino, size, mtimeMs, version, ...(moduleDir === undefined ? {} : { moduleDir }) };
}

function checkRefresh(value: unknown, bad: Bad): RefreshInFlight | undefined {
  const obj = object(value, 'refresh', ['strategy', 'target', 'startedAt', 'destination'], bad);
  if (obj === undefined) return undefined;
  const strategy = obj.strategy;
  if (strategy !== 'migrate' && strategy !== 'cpr' && strategy !== 'reboot') bad('refresh.strategy', `must be migrate, cpr or reboot, got ${describe(strategy)}`);
  const target = checkInstallation(obj.target, 'refresh.target', bad);
  const startedAt = timestamp(obj.startedAt, 'refresh.startedAt', bad);
  const destination = obj.destination === undefined ? undefined : checkOtherQemu(obj.destination, 'refresh.destination', bad);
  if ((strategy !== 'migrate' && strategy !== 'cpr' && strategy !== 'reboot') || target === undefined || startedAt === undefined) return undefined;
  if (obj.destination !== undefined && destination === undefined) return undefined;
  return { strategy, target, startedAt, ...(destination === undefined ? {} : { destination }) };
}

function checkOtherQemu(value: unknown, field: string, bad: Bad): OtherQemu | undefined {
  const obj = object(value, field, ['pid', 'startTime', 'scope', 'qmpSocket', 'moduleDir', 'taps'], bad);
  if (obj === undefined) return undefined;
  const proc = checkProcess({ pid: obj.pid, startTime: obj.startTime, scope: obj.scope, ...(obj.taps === undefined ? {} : { taps: obj.taps }) }, bad, field);
  const qmpSocket = absPath(obj.qmpSocket, `${field}.qmpSocket`, bad);
  const moduleDir = obj.moduleDir === undefined ? undefined : absPath(obj.moduleDir, `${field}.moduleDir`, bad);
  return proc === undefined || qmpSocket === undefined ? undefined : { ...proc, qmpSocket, ...(moduleDir === undefined ? {} : { moduleDir }) };
}

function checkProcess(value: unknown, bad: Bad, field = 'process'): VmRecord['process'] {
  const obj = object(value, field, ['pid', 'startTime', 'scope', 'taps'], bad);
  if (obj === undefined) return undefined;
  const taps = obj.taps === undefined ? undefined : checkTaps(obj.taps, `${field}.taps`, bad);
  const pid = obj.pid;
  const pidOk = typeof pid === 'number' && Number.isSafeInteger(pid) && pid > 0;
  if (!pidOk) bad(`${field}.pid`, `must be a whole number > 0, got ${describe(pid)}`);
  const startTime = str(obj.startTime, `${field}.startTime`, bad);
  if (startTime !== undefined && !/^\d+$/.test(startTime)) bad(`${field}.startTime`, `must be digits (field 22 of /proc/PID/stat), got ${describe(startTime)}`);
  const scope = obj.scope;
  const scopeOk = scope === null || (typeof scope === 'string' && scope !== '');
  if (!scopeOk) bad(`${field}.scope`, `must be a unit name or null, got ${describe(scope)}`);
  if (!pidOk || startTime === undefined || !/^\d+$/.test(startTime) || !scopeOk || (obj.taps !== undefined && taps === undefined)) return undefined;
  return { pid: pid as number, startTime, scope: scope as string | null, ...(taps === undefined ? {} : { taps }) };
}

function checkTaps(value: unknown, field: string, bad: Bad): string[] | undefined {
  if (!Array.isArray(value) || !value.every((t) => typeof t === 'string' && TAP_NAME_RE.test(t))) {
    bad(field, `must be a list of vmkeep TAP names, got ${describe(value)}`);
    return undefined;
  }
  return value as string[];
}

function checkPaths(value: unknown, bad: Bad): VmRecord['paths'] | undefined {
  const obj = object(value, 'paths', ['qmpSocket', 'serialLog', 'stderrLog'], bad);
  if (obj === undefined) return undefined;
  const qmpSocket = absPath(obj.qmpSocket, 'paths.qmpSocket', bad);
  const serialLog = absPath(obj.serialLog, 'paths.serialLog', bad);
  const stderrLog = absPath(obj.stderrLog, 'paths.stderrLog', bad);
  if (qmpSocket === undefined || serialLog === undefined || stderrLog === undefined) return undefined;
  return { qmpSocket, serialLog, stderrLog };
}

function checkExit(value: unknown, bad: Bad): ExitInfo | undefined {
  const obj = object(value, 'lastExit', ['reason', 'at'], bad);
  if (obj === undefined) return undefined;
  const reason = str(obj.reason, 'lastExit.reason', bad);
  const at = timestamp(obj.at, 'lastExit.at', bad);
  return reason === undefined || at === undefined ? undefined : { reason, at };
}

function object(value: unknown, field: string, known: readonly string[], bad: Bad): Obj | undefined {
  if (!isRecord(value)) {
    bad(field, `must be an object, got ${describe(value)}`);
    return undefined;
  }
  for (const key of Object.keys(value)) if (!known.includes(key)) bad(`${field}.${key}`, 'is not a known field');
  return value;
}

function str(value: unknown, field: string, bad: Bad): string | undefined {
  if (typeof value === 'string') return value;
  bad(field, `must be a string, got ${describe(value)}`);
  return undefined;
}

function absPath(value: unknown, field: string, bad: Bad): string | undefined {
  const s = str(value, field, bad);
  if (s === undefined) return undefined;
  if (!s.startsWith('/') || s.includes('\0')) {
    bad(field, `must be an absolute path, got ${describe(s)}`);
    return undefined;
  }
  return s;
}

function count(value: unknown, field: string, bad: Bad): number | undefined {
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0) return value;
  bad(field, `must be a whole number >= 0, got ${describe(value)}`);
  return undefined;
}

function timestamp(value: unknown, field: string, bad: Bad): string | undefined {
  const s = str(value, field, bad);
  if (s === undefined) return undefined;
  if (Number.isNaN(Date.parse(s))) {
    bad(field, `must be a date and time (ISO 8601), got ${describe(s)}`);
    return undefined;
  }
  return s;
}


function describe(value: unknown): string {
  if (value === undefined) return 'nothing';
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') return JSON.stringify(value.length > 60 ? `${value.slice(0, 60)}...` : value);
  if (typeof value === 'number' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  return typeof value;
}

// ---------------------------------------------------------------------------------------------
// File access (thin adapter, swapped in tests to fail at each step)

/** An open file being written. `write` writes all of `data` or throws. */
export interface RecordFileHandle {
  write(data: Uint8Array): Promise<void>;
  sync(): Promise<void>;
  close(): Promise<void>;
}

export interface RecordFs {
  /** Creates the folder and its parents; the folder itself gets `mode` even if it existed. */
  mkdir(path: string, mode: number): Promise<void>;
  /** Creates a new file (fails if it exists) for writing, with `mode`. */
  create(path: string, mode: number): Promise<RecordFileHandle>;
  rename(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
  readdir(path: string): Promise<string[]>;
  /** The file's bytes; reads at most maxBytes + 1 of them, so a caller can tell a file is too large. */
  readFile(path: string, maxBytes: number): Promise<Buffer>;
  /** fsync of a folder: makes a rename or unlink in it durable. */
  syncDir(path: string): Promise<void>;
}

/** The error code readFile throws for a path that is not a regular file (a FIFO, device, folder). */
const NOT_REGULAR = 'ENOTREG';

export const nodeRecordFs: RecordFs = {
  async mkdir(path, mode) {
    await mkdir(path, { recursive: true, mode });
    await chmod(path, mode);
  },
  async create(path, mode) {
    const fh = await open(path, 'wx', mode);
    return {
      async write(data) {
        await fh.writeFile(data);
      },
      sync: () => fh.sync(),
      close: () => fh.close(),
    };
  },
  rename: (from, to) => rename(from, to),
  unlink: (path) => unlink(path),
  readdir: (path) => readdir(path),
  async readFile(path, maxBytes) {
    // Not followed, never blocking: a symlink, a FIFO or a device planted among the records must
    // neither hang vmkeepd's start nor make it read elsewhere.
    const fh = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
    try {
      if (!(await fh.stat()).isFile()) throw Object.assign(new Error(`${path} is not a regular file`), { code: NOT_REGULAR });
      const buffer = Buffer.alloc(maxBytes + 1);
      let length = 0;
      while (length < buffer.length) {
        const { bytesRead } = await fh.read(buffer, length, buffer.length - length, null);
        if (bytesRead === 0) break;
        length += bytesRead;
      }
      return buffer.subarray(0, length);
    } finally {
      await fh.close();
    }
  },
  async syncDir(path) {
    const fh = await open(path, 'r');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
  },
};

// `.<target>.<pid>-<16 hex>.tmp`: hidden, so it never ends in `.json` and is never taken for a record.
const TEMP_RE = /^\.(.+)\.\d+-[0-9a-f]{16}\.tmp$/;

/** The file a temp file of writeFileAtomic was going to replace, or null if `fileName` is no such temp file. */
export function tempFileTarget(fileName: string): string | null {
  return TEMP_RE.exec(fileName)?.[1] ?? null;
}

/**
 * Replaces `path` atomically and durably: a uniquely named temp file in the same folder,
 * write, fsync, rename over `path`, fsync of the folder. A crash at any instant leaves the
 * old content or the new one (plus, at worst, a temp file that tempFileTarget recognises).
 * Throws STATE_IO; before the rename the old content is untouched and the temp file removed.
 */
export async function writeFileAtomic(
  path: string, data: string | Uint8Array, options: { mode?: number; fs?: RecordFs } = {},
): Promise<void> {
  const fs = options.fs ?? nodeRecordFs;
  const dir = dirname(path);
  const temp = join(dir, `.${basename(path)}.${process.pid}-${randomBytes(8).toString('hex')}.tmp`);
  const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  let handle: RecordFileHandle | undefined;
  let step = 'create the temp file';
  try {
    handle = await fs.create(temp, options.mode ?? 0o600);
    step = 'write the temp file';
    await handle.write(bytes);
    step = 'fsync the temp file';
    await handle.sync();
    step = 'close the temp file';
    const closing = handle;
    handle = undefined;
    await closing.close();
    step = 'rename the temp file over it';
    await fs.rename(temp, path);
  } catch (err) {
    if (handle !== undefined) await handle.close().catch(() => undefined);
    await fs.unlink(temp).catch(() => undefined);
    throw new DaemonError('STATE_IO',
      `could not write ${path}: failed to ${step} (${errText(err)}); the previous content is unchanged. `
      + `Check free space and permissions of ${dir}`, { cause: err });
  }
  try {
    await fs.syncDir(dir);
  } catch (err) {
    throw new DaemonError('STATE_IO',
      `${path} was replaced, but the fsync of folder ${dir} failed (${errText(err)}): the new content may not survive `
      + 'a power loss. Check the file system holding the state folder', { cause: err });
  }
}

function errText(err: unknown): string {
  const code = (err as NodeJS.ErrnoException | undefined)?.code;
  const message = err instanceof Error ? err.message : String(err);
  return code === undefined || message.includes(code) ? message : `${code}: ${message}`;
}

function isMissing(err: unknown): boolean {
  return (err as NodeJS.ErrnoException | undefined)?.code === 'ENOENT';
}

// ---------------------------------------------------------------------------------------------
// The store

export interface DamagedRecord {
  name: string;
  file: string;
  error: DaemonError;
}

/**
 * One JSON file per VM in `dir` (usually recordsDir(stateDir)). Only one daemon may use a
 * folder at a time (see acquireDaemonLock): init() removes temp files it takes as crash leftovers.
 * A damaged record is reported, never deleted or overwritten by reading.
 */
export class RecordStore {
  readonly dir: string;
  private readonly fs: RecordFs;

  constructor(dir: string, fs: RecordFs = nodeRecordFs) {
    this.dir = dir;
    this.fs = fs;
  }

  /** The file of a VM's record. */
  fileOf(name: string): string {
    return join(this.dir, `${name}.json`);
  }

  /** Creates the folder (0700) and removes temp files left by a crash; returns their names. */
  async init(): Promise<string[]> {
    try {
      await this.fs.mkdir(this.dir, 0o700);
      const leftovers = (await this.fs.readdir(this.dir)).filter((f) => tempFileTarget(f) !== null).sort();
      for (const f of leftovers) {
        await this.fs.unlink(join(this.dir, f)).catch((err: unknown) => {
          if (!isMissing(err)) throw err;
        });
      }
      if (leftovers.length > 0) await this.fs.syncDir(this.dir);
      return leftovers;
    } catch (err) {
      throw new DaemonError('STATE_IO', `could not prepare the record folder ${this.dir} (${errText(err)}): check its permissions and free space`, { cause: err });
    }
  }

  /** Every readable record (sorted by name) and every damaged one (reported, left on disk). */
  async list(): Promise<{ records: VmRecord[]; damaged: DamagedRecord[] }> {
    let entries: string[];
    try {
      entries = await this.fs.readdir(this.dir);
    } catch (err) {
      throw new DaemonError('STATE_IO', `could not list the record folder ${this.dir} (${errText(err)})`, { cause: err });
    }
    const records: VmRecord[] = [];
    const damaged: DamagedRecord[] = [];
    for (const entry of entries.sort()) {
      if (!entry.endsWith('.json')) continue;
      const name = entry.slice(0, -'.json'.length);
      const file = join(this.dir, entry);
      if (!isValidVmName(name)) {
        damaged.push({ name, file, error: corrupt(file, [`its name ${JSON.stringify(name)} is not a valid VM name`]) });
        continue;
      }
      try {
        const record = await this.load(name);
        if (record !== null) records.push(record);
      } catch (err) {
        if (!(err instanceof DaemonError)) throw err;
        damaged.push({ name, file, error: err });
      }
    }
    return { records, damaged };
  }

  /** The record of `name`, or null if it has none. Throws RECORD_CORRUPT, RECORD_TOO_NEW or STATE_IO. */
  async get(name: string): Promise<VmRecord | null> {
    checkName(name);
    return this.load(name);
  }

  /**
   * Writes the record atomically (old or new survives any crash), mode 0600. Stores exactly
   * what it is given: timestamps and states are the caller's business. A record that would
   * not read back is refused (INTERNAL) and nothing is written.
   */
  async put(record: VmRecord): Promise<void> {
    const text = `${JSON.stringify({ ...record, schema: schemaToWrite(record) }, null, 2)}\n`;
    const problems: string[] = [];
    const name = typeof record.name === 'string' ? record.name : '';
    checkRecord(upgradeRecord(JSON.parse(text), RECORD_UPGRADES, `${name}.json`), name, problems);
    if (problems.length > 0) {
      throw new DaemonError('INTERNAL', `refusing to write the record of VM ${JSON.stringify(name)}, it would not read back: `
        + `${problems.join('; ')}. This is a bug in vmkeepd; nothing was written`);
    }
    await writeFileAtomic(this.fileOf(name), text, { mode: 0o600, fs: this.fs });
  }

  /** Deletes the record durably; a missing record is fine. */
  async remove(name: string): Promise<void> {
    checkName(name);
    const file = this.fileOf(name);
    try {
      await this.fs.unlink(file);
    } catch (err) {
      if (isMissing(err)) return;
      throw new DaemonError('STATE_IO', `could not delete ${file} (${errText(err)}): check the permissions of ${this.dir}`, { cause: err });
    }
    try {
      await this.fs.syncDir(this.dir);
    } catch (err) {
      throw new DaemonError('STATE_IO', `${file} was deleted, but the fsync of ${this.dir} failed (${errText(err)}): it may reappear after a power loss`, { cause: err });
    }
  }

  private async load(name: string): Promise<VmRecord | null> {
    const file = this.fileOf(name);
    let bytes: Buffer;
    try {
      bytes = await this.fs.readFile(file, RECORD_MAX_BYTES);
    } catch (err) {
      if (isMissing(err)) return null;
      const code = (err as NodeJS.ErrnoException).code;
      if (code === NOT_REGULAR || code === 'ELOOP') {
        throw corrupt(file, [code === 'ELOOP' ? 'is a symbolic link, which vmkeepd does not follow' : 'is not a regular file (a FIFO, device or folder)'], err);
      }
      throw new DaemonError('STATE_IO', `could not read ${file} (${errText(err)}): check its permissions; the VM is left alone`, { cause: err });
    }
    if (bytes.length > RECORD_MAX_BYTES) throw corrupt(file, [`is larger than ${RECORD_MAX_BYTES} bytes`]);
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch (err) {
      throw corrupt(file, ['is not UTF-8 text'], err);
    }
    return parseRecord(text, file);
  }
}

function checkName(name: string): void {
  if (typeof name !== 'string' || !isValidVmName(name)) {
    throw new DaemonError('INVALID_REQUEST', `${describeValue(name)} is not a valid VM name: ${VM_NAME_RULE}`);
  }
}
