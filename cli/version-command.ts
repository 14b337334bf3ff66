import { probeInstallation, type Installation } from '../launcher/index.js';
import { loadInstallationsConfig } from '../upgrade/index.js';
import { VERSION } from './version.js';

/** One QEMU installation as `vmkeep --version --json` reports it. */
export interface VersionInstallation {
  name: string;
  binary: string;
  current: string[];
  version?: string;
  error?: string;
}

export interface VersionReport {
  version: string;
  node: string;
  installations: VersionInstallation[];
  /** Why no installation could be listed (no QEMU in PATH, an unreadable installations file). */
  installationsError?: string;
}

/**
 * `--version` is answered before the command line is parsed, so that `vmkeep --version`,
 * `vmkeepd --version` and `vmkeep version` work with any other flag (--json, --installations...).
 * Returns the arguments for the `version` command, or undefined when no version was asked for.
 */
export function versionRequest(argv: readonly string[]): string[] | undefined {
  const asked = argv.includes('--version') || argv.includes('-V') || argv[0] === 'version' || (argv[0] === 'daemon' && argv[1] === 'version');
  if (!asked) return undefined;
  return ['version', ...argv.filter((arg, i) => arg !== '--version' && arg !== '-V' && !(i <= 1 && (arg === 'version' || arg === 'daemon')))];
}

/**
 * The version report. The QEMU installations are probed only for --json (a plain --version
 * must be instant): from the installations file when one is named, else the one --qemu names.
 */
export async function versionReport(
  withInstallations: boolean,
  source: { installationsFile?: string; single: () => Installation },
  cacheDir: string,
): Promise<VersionReport> {
  const report: VersionReport = { version: VERSION, node: process.versions.node, installations: [] };
  if (!withInstallations) return report;
  let installations: Installation[];
  let current: Record<string, string>;
  try {
    if (source.installationsFile === undefined) {
      const single = source.single();
      installations = [single];
      current = { default: single.name };
    } else {
      ({ installations, current } = await loadInstallationsConfig(source.installationsFile));
    }
  } catch (error) {
    report.installationsError = (error as Error).message;
    return report;
  }
  report.installations = await Promise.all(installations.map(async (inst): Promise<VersionInstallation> => {
    const row: VersionInstallation = {
      name: inst.name,
      binary: inst.binary,
      current: Object.entries(current).filter(([, name]) => name === inst.name).map(([channel]) => channel),
    };
    try {
      row.version = (await probeInstallation(inst, { cacheDir })).version;
    } catch (error) {
      row.error = (error as Error).message;
    }
    return row;
  }));
  return report;
}

export function formatVersion(report: VersionReport): string {
  const lines = [`vmkeep ${report.version} (Node.js ${report.node})`];
  for (const inst of report.installations) {
    const channels = inst.current.length === 0 ? '' : ` (current on ${inst.current.join(', ')})`;
    lines.push(`${inst.name}: ${inst.error === undefined ? `QEMU ${inst.version}` : `error: ${inst.error}`} ${inst.binary}${channels}`);
  }
  if (report.installationsError !== undefined) lines.push(`installations: ${report.installationsError}`);
  return lines.join('\n');
}
