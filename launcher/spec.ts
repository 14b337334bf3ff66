import { isRecord } from '../qmp/index.js';
import { LaunchError, type SpecProblem } from './errors.js';
import { describeValue, SIMPLE_NAME_RE, UUID_RE, VM_NAME_MAX_LENGTH, VM_NAME_RULE, vmNameProblem } from './names.js';
import { checkNics, type NicSpec } from './nics.js';
import { closest } from './similar.js';

export type Accel = 'tcg' | 'kvm';
export type DiskFormat = 'raw' | 'qcow2';
/**
 * Where guest RAM lives. `anonymous`: QEMU's private memory (a live migration copies it).
 * `memfd-shared`: a shared memfd, which a cpr-transfer refresh hands to the new QEMU instead of
 * copying it (QEMU >= 10.0); the cost is that the RAM is shared memory (counted as Shmem, not
 * swapped like anonymous memory, and never merged by KSM).
 */
export type MemoryBackend = 'anonymous' | 'memfd-shared';
export const MEMORY_BACKENDS: readonly MemoryBackend[] = ['anonymous', 'memfd-shared'];

/**
 * `writeback` (QEMU's default): the host page cache is used and the guest's flushes reach the
 * disk. `none`: O_DIRECT, bypassing the host cache (the image's filesystem must allow it).
 */
export type DiskCache = 'writeback' | 'none';
export const DISK_CACHES: readonly DiskCache[] = ['writeback', 'none'];

export interface DiskSpec {
  path: string;
  format: DiskFormat;
  readOnly: boolean;
  cache: DiskCache;
  /** Pass the guest's discard (TRIM) requests on to the image, freeing its space. */
  discard: boolean;
}

/** A validated VM spec: defaults filled in, optional fields absent rather than undefined. */
export interface VmSpec {
  name: string;
  memoryMiB: number;
  vcpus: number;
  machine: string;
  accel: Accel;
  cpu: string;
  kernel?: string;
  initrd?: string;
  append?: string;
  disks: DiskSpec[];
  uuid?: string;
  /** Absent: decided when the VM is created (memfd-shared where the installation can do cpr-transfer). */
  memory?: { backend: MemoryBackend };
  /** The scope's CPUWeight= (systemd's default 100 when absent): a share against other VMs. */
  cpuWeight?: number;
  /** Network interfaces (absent: none). Every NIC of a created VM has its MAC recorded. */
  nics?: NicSpec[];
}

export const SPEC_DEFAULTS = {
  memoryMiB: 256,
  vcpus: 1,
  machine: 'q35',
  // KVM hangs guests on some hosts while claiming to work; TCG is slow but always honest.
  accel: 'tcg',
  cpu: 'qemu64',
} as const satisfies Partial<VmSpec>;

export const SPEC_LIMITS = {
  nameMaxLength: VM_NAME_MAX_LENGTH,
  memoryMiB: { min: 16, max: 1_048_576 },
  vcpus: { min: 1, max: 64 },
  maxDisks: 16,
  // x86 Linux truncates longer command lines (COMMAND_LINE_SIZE).
  appendMaxLength: 2048,
  pathMaxLength: 4095,
  // systemd's CPUWeight= range.
  cpuWeight: { min: 1, max: 10_000 },
} as const;

const SPEC_FIELDS = [
  'name', 'memoryMiB', 'vcpus', 'machine', 'accel', 'cpu', 'kernel', 'initrd', 'append', 'disks', 'uuid', 'memory', 'cpuWeight', 'nics',
] as const;
const MEMORY_FIELDS = ['backend'] as const;
const DISK_FIELDS = ['path', 'format', 'readOnly', 'cache', 'discard'] as const;

// CPU names go into comma-separated QEMU options: no commas, no "=", nothing exotic.
const CPU_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/**
 * Checks a VM spec (e.g. parsed JSON) and returns it with defaults filled in.
 * Collects every problem before throwing LaunchError('INVALID_SPEC'), so a user fixes
 * everything in one go. Pure: files are checked separately by checkSpecFiles().
 */
export function validateSpec(input: unknown): VmSpec {
  if (!isRecord(input)) {
    throw invalid([{ field: 'spec', message: `must be an object, got ${describeValue(input)}`, fix: 'pass a JSON object with at least "name" and "kernel" or "disks"' }]);
  }
  const problems: SpecProblem[] = [];
  const add = (field: string, message: string, fix: string): void => {
    problems.push({ field, message, fix });
  };

  reportUnknownFields(input, SPEC_FIELDS, '', add);

  const name = checkName(input.name, add);
  const memoryMiB = checkInteger(input.memoryMiB, 'memoryMiB', SPEC_DEFAULTS.memoryMiB, SPEC_LIMITS.memoryMiB, 'MiB of guest RAM', add);
  const vcpus = checkInteger(input.vcpus, 'vcpus', SPEC_DEFAULTS.vcpus, SPEC_LIMITS.vcpus, 'virtual CPUs', add);
  const machine = checkPattern(input.machine, 'machine', SPEC_DEFAULTS.machine, SIMPLE_NAME_RE,
    'use a machine type such as "q35", "pc" or "pc-q35-7.2" (`qemu-system-x86_64 -machine help` lists them)', add);
  const cpu = checkPattern(input.cpu, 'cpu', SPEC_DEFAULTS.cpu, CPU_RE,
    'use a CPU model name such as "qemu64" or "host" (`qemu-system-x86_64 -cpu help` lists them); CPU flags are not supported', add);
  const accel = checkAccel(input.accel, add);
  const kernel = checkPath(input.kernel, 'kernel', add);
  const initrd = checkPath(input.initrd, 'initrd', add);
  const append = checkAppend(input.append, add);
  const disks = checkDisks(input.disks, add);
  const uuid = checkUuid(input.uuid, add);
  const memory = checkMemory(input.memory, add);
  const cpuWeight = input.cpuWeight === undefined ? undefined
    : checkInteger(input.cpuWeight, 'cpuWeight', 100, SPEC_LIMITS.cpuWeight, 'CPU weight units', add);
  const nics = checkNics(input.nics, add, (obj, known, prefix) => reportUnknownFields(obj, known, prefix, add));

  if (input.kernel === undefined) {
    if (input.initrd !== undefined) add('initrd', 'is given without a kernel', 'set "kernel" as well, or remove "initrd"');
    if (input.append !== undefined) add('append', 'is given without a kernel', 'set "kernel" as well, or remove "append"');
    if (input.disks === undefined || (Array.isArray(input.disks) && input.disks.length === 0)) {
      add('kernel', 'no boot source: neither "kernel" nor any disk is given', 'set "kernel" (with optional "initrd" and "append") or add at least one entry to "disks"');
    }
  }

  if (problems.length > 0) throw invalid(problems);

  // Every value below was checked above; the fallbacks only satisfy the type checker.
  const spec: VmSpec = {
    name: name ?? '',
    memoryMiB,
    vcpus,
    machine,
    accel,
    cpu,
    disks,
  };
  if (kernel !== undefined) spec.kernel = kernel;
  if (initrd !== undefined) spec.initrd = initrd;
  if (append !== undefined) spec.append = append;
  if (uuid !== undefined) spec.uuid = uuid;
  if (memory !== undefined) spec.memory = memory;
  if (cpuWeight !== undefined) spec.cpuWeight = cpuWeight;
  if (nics.length > 0) spec.nics = nics;
  return spec;
}

/** Formats problems as the INVALID_SPEC message: one `field: what; fix: how` per line. */
export function formatSpecProblems(problems: readonly SpecProblem[]): string {
  const lines = problems.map((p) => `  ${p.field}: ${p.message}; fix: ${p.fix}`);
  const count = problems.length === 1 ? '1 problem' : `${problems.length} problems`;
  return `invalid VM spec (${count}):\n${lines.join('\n')}`;
}

type Add = (field: string, message: string, fix: string) => void;

function invalid(problems: SpecProblem[]): LaunchError {
  return new LaunchError('INVALID_SPEC', formatSpecProblems(problems), { problems });
}


function reportUnknownFields(obj: Record<string, unknown>, known: readonly string[], prefix: string, add: Add): void {
  for (const key of Object.keys(obj)) {
    if (known.includes(key)) continue;
    const hint = closest(key, known, 1)[0];
    add(`${prefix}${key}`, 'is not a known field',
      hint === undefined ? `remove it (known fields: ${known.join(', ')})` : `remove it, or did you mean "${hint}"?`);
  }
}

function checkName(value: unknown, add: Add): string | undefined {
  if (value === undefined) {
    add('name', 'is required', `give a name of ${VM_NAME_RULE}`);
    return undefined;
  }
  if (typeof value !== 'string') {
    add('name', `must be a string, got ${describeValue(value)}`, `give a name of ${VM_NAME_RULE}`);
    return undefined;
  }
  const problem = vmNameProblem(value);
  if (problem !== undefined) add('name', problem, `use ${VM_NAME_RULE}`);
  return value;
}

function checkInteger(
  value: unknown, field: string, fallback: number, range: { min: number; max: number }, unit: string, add: Add,
): number {
  if (value === undefined) return fallback;
  const fix = `use a whole number of ${unit} from ${range.min} to ${range.max} (default ${fallback})`;
  if (typeof value !== 'number' || !Number.isInteger(value)) {
    add(field, `must be a whole number, got ${describeValue(value)}`, fix);
  } else if (value < range.min || value > range.max) {
    add(field, `${value} is out of range`, fix);
  }
  return typeof value === 'number' ? value : fallback;
}

function checkPattern(value: unknown, field: string, fallback: string, re: RegExp, fix: string, add: Add): string {
  if (value === undefined) return fallback;
  if (typeof value !== 'string') {
    add(field, `must be a string, got ${describeValue(value)}`, fix);
    return fallback;
  }
  if (!re.test(value)) add(field, `${JSON.stringify(value)} is not a valid name`, fix);
  return value;
}

function checkAccel(value: unknown, add: Add): Accel {
  if (value === undefined) return SPEC_DEFAULTS.accel;
  if (value === 'tcg' || value === 'kvm') return value;
  add('accel', `must be "tcg" or "kvm", got ${describeValue(value)}`, 'use "tcg" (default, works everywhere) or "kvm" (only where a real boot under KVM was proven)');
  return SPEC_DEFAULTS.accel;
}

function checkPath(value: unknown, field: string, add: Add): string | undefined {
  if (value === undefined) return undefined;
  const fix = 'give an absolute path (starting with "/") to an existing file';
  if (typeof value !== 'string') {
    add(field, `must be a string, got ${describeValue(value)}`, fix);
  } else if (!value.startsWith('/')) {
    add(field, `${JSON.stringify(value)} is not an absolute path`, fix);
  } else if (/[\0\n]/.test(value)) {
    add(field, 'contains a NUL or newline character', fix);
  } else if (value.length > SPEC_LIMITS.pathMaxLength) {
    add(field, `is ${value.length} characters long, the limit is ${SPEC_LIMITS.pathMaxLength}`, fix);
  } else {
    return value;
  }
  return undefined;
}

function checkAppend(value: unknown, add: Add): string | undefined {
  if (value === undefined) return undefined;
  const fix = `give the kernel command line as one string of at most ${SPEC_LIMITS.appendMaxLength} characters`;
  if (typeof value !== 'string') {
    add('append', `must be a string, got ${describeValue(value)}`, fix);
  } else if (value.includes('\0')) {
    add('append', 'contains a NUL character', fix);
  } else if (value.length > SPEC_LIMITS.appendMaxLength) {
    add('append', `is ${value.length} characters long`, fix);
  } else {
    return value;
  }
  return undefined;
}

function checkUuid(value: unknown, add: Add): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value === 'string' && UUID_RE.test(value)) return value.toLowerCase();
  add('uuid', `${describeValue(value)} is not a UUID`, 'use the form 123e4567-e89b-12d3-a456-426614174000, or leave it out to get a generated one');
  return undefined;
}

function checkMemory(value: unknown, add: Add): VmSpec['memory'] {
  if (value === undefined) return undefined;
  const fix = `give { "backend": ${MEMORY_BACKENDS.map((b) => `"${b}"`).join(' | ')} }, or leave "memory" out for the installation's default (the size is memoryMiB)`;
  if (!isRecord(value)) {
    add('memory', `must be an object, got ${describeValue(value)}`, fix);
    return undefined;
  }
  reportUnknownFields(value, MEMORY_FIELDS, 'memory.', add);
  const backend = value.backend;
  if (!(MEMORY_BACKENDS as readonly unknown[]).includes(backend)) {
    add('memory.backend', backend === undefined ? 'is required' : `must be one of ${MEMORY_BACKENDS.join(', ')}, got ${describeValue(backend)}`, fix);
    return undefined;
  }
  return { backend: backend as MemoryBackend };
}

function checkDisks(value: unknown, add: Add): DiskSpec[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) {
    add('disks', `must be an array, got ${describeValue(value)}`, 'give a list like [{ "path": "/var/lib/vm/a.qcow2", "format": "qcow2" }]');
    return [];
  }
  if (value.length > SPEC_LIMITS.maxDisks) {
    add('disks', `has ${value.length} entries, the limit is ${SPEC_LIMITS.maxDisks}`, 'attach fewer disks');
  }
  const disks: DiskSpec[] = [];
  const firstIndexOfPath = new Map<string, number>();
  value.forEach((entry: unknown, i) => {
    const field = `disks[${i}]`;
    if (!isRecord(entry)) {
      add(field, `must be an object, got ${describeValue(entry)}`, 'give { "path": ..., "format": "raw" | "qcow2", "readOnly"?: true|false, "cache"?: "writeback"|"none", "discard"?: true|false }');
      return;
    }
    reportUnknownFields(entry, DISK_FIELDS, `${field}.`, add);
    const path = entry.path === undefined ? undefined : checkPath(entry.path, `${field}.path`, add);
    if (entry.path === undefined) add(`${field}.path`, 'is required', 'give the absolute path of the disk image');
    const format = entry.format;
    if (format !== 'raw' && format !== 'qcow2') {
      add(`${field}.format`, format === undefined ? 'is required' : `must be "raw" or "qcow2", got ${describeValue(format)}`,
        'set "format" explicitly: QEMU guessing the format of a raw image is a security hole');
    }
    if (entry.readOnly !== undefined && typeof entry.readOnly !== 'boolean') {
      add(`${field}.readOnly`, `must be true or false, got ${describeValue(entry.readOnly)}`, 'use true or false (default false)');
    }
    if (entry.cache !== undefined && !(DISK_CACHES as readonly unknown[]).includes(entry.cache)) {
      add(`${field}.cache`, `must be ${DISK_CACHES.map((c) => `"${c}"`).join(' or ')}, got ${describeValue(entry.cache)}`,
        'use "writeback" (default: the host caches, the guest\'s flushes reach the disk) or "none" (O_DIRECT)');
    }
    if (entry.discard !== undefined && typeof entry.discard !== 'boolean') {
      add(`${field}.discard`, `must be true or false, got ${describeValue(entry.discard)}`, 'use true to pass the guest\'s discards to the image, false (default) to ignore them');
    }
    if (path !== undefined) {
      const earlier = firstIndexOfPath.get(path);
      if (earlier !== undefined) {
        add(`${field}.path`, `is the same file as disks[${earlier}].path`, 'attach each image once');
      } else {
        firstIndexOfPath.set(path, i);
      }
    }
    if (path !== undefined && (format === 'raw' || format === 'qcow2')) {
      disks.push({
        path, format, readOnly: entry.readOnly === true,
        cache: entry.cache === 'none' ? 'none' : 'writeback',
        discard: entry.discard === true,
      });
    }
  });
  return disks;
}
