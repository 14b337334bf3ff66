// The naming rules of vmkeep, written once: VM names end up in systemd unit names and file
// names, machine types and channel names in QEMU's comma-separated options and in records.

/** Lowercase, digits and `._-`, starting with a letter or digit: safe in units, paths and QEMU options. */
export const SIMPLE_NAME_RE = /^[a-z0-9][a-z0-9._-]{0,63}$/;
export const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A UUID as vmkeep writes it (randomUUID, records): lowercase, so one id names one file. */
export function isLowercaseUuid(value: string): boolean {
  return UUID_RE.test(value) && value === value.toLowerCase();
}

export const VM_NAME_MAX_LENGTH = 63;
export const VM_NAME_RULE =
  '1 to 63 characters: lowercase letters, digits, "_", "." and "-", starting with a letter or digit, without ".."';

/** Why `name` is not a valid VM name, or undefined when it is. */
export function vmNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'is empty';
  if (name.length > VM_NAME_MAX_LENGTH) return `is ${name.length} characters long, the limit is ${VM_NAME_MAX_LENGTH}`;
  const bad = [...new Set(name.replace(/[a-z0-9_.-]/g, ''))];
  if (bad.length > 0) return `contains characters that are not allowed: ${bad.map((c) => JSON.stringify(c)).join(' ')}`;
  if (!/^[a-z0-9]/.test(name)) return `starts with ${JSON.stringify(name[0])}`;
  if (name.includes('..')) return 'contains ".."';
  return undefined;
}

/** True when `name` may be used as a VM name (systemd unit names, file names). */
export function isValidVmName(name: string): boolean {
  return typeof name === 'string' && vmNameProblem(name) === undefined;
}

/**
 * Why a VM name cannot be its machine name with systemd-machined (which takes host names only:
 * dot-separated labels of letters, digits and inner "-"), or undefined when it can.
 */
export function machineNameProblem(name: string): string | undefined {
  if (name.includes('_')) return 'contains "_"';
  const label = name.split('.').find((l) => l === '' || l.startsWith('-') || l.endsWith('-'));
  if (label !== undefined) return label === '' ? 'has an empty label (a "." at the end)' : `has a label that starts or ends with "-" (${JSON.stringify(label)})`;
  return undefined;
}

const DESCRIBE_MAX_CHARS = 40;

/**
 * A value named for an error message, bounded whatever it is: input may be huge or nested
 * 100,000 levels deep (JSON.stringify of that throws), and messages end up in logs and records.
 */
export function describeValue(value: unknown): string {
  if (value === null) return 'null';
  if (Array.isArray(value)) return 'an array';
  if (typeof value === 'string') {
    return `the string ${JSON.stringify(value.length > DESCRIBE_MAX_CHARS ? `${value.slice(0, DESCRIBE_MAX_CHARS)}...` : value)}`;
  }
  if (typeof value === 'number' || typeof value === 'boolean') return `${typeof value} ${String(value)}`;
  if (typeof value === 'object') return 'an object';
  return typeof value;
}
