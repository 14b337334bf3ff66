import { readFile } from 'node:fs/promises';
import { isAbsolute } from 'node:path';
import { isRecord } from '../qmp/index.js';
import { SIMPLE_NAME_RE, type Installation } from '../launcher/index.js';
import { UpgradeError } from './errors.js';

/** The channel of a VM that names none. */
export const DEFAULT_CHANNEL = 'default';

/**
 * The QEMU installations this host has and which one is current on each channel. A package
 * upgrade changes what the current one is: new files at the same path (deb) or a new
 * installation at a new path (a snap revision).
 */
export interface InstallationsConfig {
  installations: Installation[];
  /** channel -> installation name */
  current: Record<string, string>;
}


/**
 * Parses an installations file (JSON). Every problem is named with its field and the fix;
 * a file with any problem is refused whole, so a typo never silently changes what is current.
 */
export function parseInstallationsConfig(text: string, file: string): InstallationsConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch (cause) {
    throw bad(file, [`is not JSON (${(cause as Error).message})`], cause);
  }
  const problems: string[] = [];
  if (!isRecord(raw)) throw bad(file, ['must hold an object {"installations": [...], "current": {...}}']);
  for (const key of Object.keys(raw)) {
    if (key !== 'installations' && key !== 'current') problems.push(`unknown field "${key}" (known: installations, current)`);
  }
  const installations: Installation[] = [];
  if (!Array.isArray(raw.installations) || raw.installations.length === 0) {
    problems.push('"installations" must be a non-empty array of {name, binary, moduleDir?, firmwareDirs?}');
  } else {
    raw.installations.forEach((item: unknown, i: number) => {
      const inst = checkInstallation(item, `installations[${i}]`, problems);
      if (inst === undefined) return;
      if (installations.some((other) => other.name === inst.name)) problems.push(`installations[${i}].name "${inst.name}" is used twice`);
      installations.push(inst);
    });
  }
  const current: Record<string, string> = {};
  if (!isRecord(raw.current)) {
    problems.push(`"current" must map a channel to an installation name, e.g. {"${DEFAULT_CHANNEL}": "${installations[0]?.name ?? 'qemu'}"}`);
  } else {
    for (const [channel, name] of Object.entries(raw.current)) {
      if (!SIMPLE_NAME_RE.test(channel)) problems.push(`current: channel ${JSON.stringify(channel)} must match ${SIMPLE_NAME_RE}`);
      else if (typeof name !== 'string' || !installations.some((inst) => inst.name === name)) {
        problems.push(`current.${channel} is ${JSON.stringify(name)}, which names no installation (have: ${installations.map((i) => i.name).join(', ') || 'none'})`);
      } else current[channel] = name;
    }
    if (raw.current[DEFAULT_CHANNEL] === undefined) problems.push(`current.${DEFAULT_CHANNEL} is missing: VMs that name no channel use it`);
  }
  if (problems.length > 0) throw bad(file, problems);
  return { installations, current };
}

function checkInstallation(value: unknown, at: string, problems: string[]): Installation | undefined {
  if (!isRecord(value)) {
    problems.push(`${at} must be an object {name, binary, moduleDir?, firmwareDirs?}`);
    return undefined;
  }
  const before = problems.length;
  for (const key of Object.keys(value)) {
    if (!['name', 'binary', 'moduleDir', 'firmwareDirs'].includes(key)) problems.push(`${at}: unknown field "${key}"`);
  }
  const { name, binary, moduleDir, firmwareDirs = [] } = value;
  if (typeof name !== 'string' || !SIMPLE_NAME_RE.test(name)) problems.push(`${at}.name must match ${SIMPLE_NAME_RE}, got ${JSON.stringify(name)}`);
  if (!absolute(binary)) problems.push(`${at}.binary must be an absolute path, got ${JSON.stringify(binary)}`);
  if (moduleDir !== undefined && !absolute(moduleDir)) problems.push(`${at}.moduleDir must be an absolute path, got ${JSON.stringify(moduleDir)}`);
  if (!Array.isArray(firmwareDirs) || !firmwareDirs.every(absolute)) {
    problems.push(`${at}.firmwareDirs must be an array of absolute paths, got ${JSON.stringify(firmwareDirs)}`);
  }
  if (problems.length > before) return undefined;
  return {
    name: name as string,
    binary: binary as string,
    firmwareDirs: firmwareDirs as string[],
    ...(moduleDir === undefined ? {} : { moduleDir: moduleDir as string }),
  };
}

export async function loadInstallationsConfig(file: string): Promise<InstallationsConfig> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (cause) {
    throw bad(file, [`cannot be read (${(cause as Error).message})`], cause);
  }
  return parseInstallationsConfig(text, file);
}

/** The configuration of a host with one installation (vmkeepd --qemu ...). */
export function singleInstallation(installation: Installation): InstallationsConfig {
  return { installations: [installation], current: { [DEFAULT_CHANNEL]: installation.name } };
}

/** The installation now current on a channel. */
export function currentInstallation(config: InstallationsConfig, channel: string): Installation {
  const name = config.current[channel];
  const inst = config.installations.find((i) => i.name === name);
  if (inst === undefined) {
    throw new UpgradeError('NO_INSTALLATION',
      `no installation is current on channel "${channel}" (channels: ${Object.keys(config.current).join(', ')}); add "${channel}" to "current" in the installations file and restart vmkeepd`);
  }
  return inst;
}

function absolute(value: unknown): value is string {
  return typeof value === 'string' && isAbsolute(value) && !value.includes('\0');
}


function bad(file: string, problems: string[], cause?: unknown): UpgradeError {
  return new UpgradeError('BAD_CONFIG',
    `installations file ${file}: ${problems.join('; ')}. Fix the file and restart vmkeepd; nothing was changed`,
    cause === undefined ? undefined : { cause });
}
