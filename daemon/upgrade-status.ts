// Which VMs run an old QEMU, why, and what their policy will do. Read from the records and
// /proc only: a hung QEMU must not slow the answer for the others (no QMP here).
import { existsSync } from 'node:fs';
import type { Installation, InstallationInfo } from '../launcher/index.js';
import { assessStaleness, currentInstallation, policyOutcome, type Staleness } from '../upgrade/index.js';
import type { UpgradeStatus, VmUpgradeStatus } from './model.js';
import type { VmCore } from './vm-core.js';
import { exeOf, type VmEntry } from './vm-entry.js';

export async function upgradeStatus(core: VmCore): Promise<UpgradeStatus> {
  const { installations, defaultPolicy, probe } = core.options;
  const channels = await Promise.all(Object.entries(installations.current).map(async ([channel, name]) => {
    const inst = currentInstallation(installations, channel);
    return { channel, installation: name, binary: inst.binary, version: (await probe(inst)).version };
  }));
  const vms = await Promise.all(core.entries().map((entry) => vmUpgradeStatus(core, entry).catch((error: unknown): VmUpgradeStatus => ({
    name: entry.record.name, state: entry.record.state, channel: entry.record.channel, installation: entry.record.installation.name,
    currentInstallation: '?', currentVersion: '?', stale: false, reasons: [], policy: core.policyOf(entry.record),
    outcome: 'unknown', warnings: [`cannot be assessed: ${(error as Error).message}`],
  }))));
  return { defaultPolicy, channels, vms: vms.sort((a, b) => a.name.localeCompare(b.name)) };
}

async function vmUpgradeStatus(core: VmCore, entry: VmEntry): Promise<VmUpgradeStatus> {
  const { record } = entry;
  const target = core.current(record);
  const info = await core.options.probe(target);
  const status: Staleness = record.process ? await stalenessOf(core, entry, target, info) : { stale: false, reasons: [], currentVersion: info.version };
  const policy = core.policyOf(record);
  const row: VmUpgradeStatus = {
    name: record.name, state: record.state, channel: record.channel, installation: record.installation.name,
    currentInstallation: target.name, currentVersion: info.version, stale: status.stale, reasons: status.reasons,
    policy, outcome: policyOutcome(status.stale, policy),
  };
  const runningVersion = status.runningVersion ?? (record.process ? record.binary?.version : undefined);
  if (runningVersion !== undefined) row.runningVersion = runningVersion;
  if (record.refresh) row.refreshing = record.refresh.strategy;
  if (record.process) {
    row.pid = record.process.pid;
    const exe = await exeOf(core.options.qemu, record, info.identity);
    if (exe) row.exe = exe.deleted ? `${exe.path} (deleted)` : exe.path;
    if (exe && status.stale && (exe.deleted || !existsSync(exe.path))) {
      // A package manager (snapd dropping an old revision, dpkg replacing the file) took the
      // binary away: this QEMU runs from memory and nothing can start that build again.
      row.warnings = [`its QEMU binary ${exe.path} is gone from disk (removed or replaced by a package upgrade, e.g. a snap revision snapd no longer keeps); it keeps running, but refresh it soon: vmkeep refresh ${record.name} --strategy migrate`];
    }
  }
  return row;
}

/** How long a refresh waits for the running QEMU's own query-version before using the recorded one. */
const LIVE_VERSION_TIMEOUT_MS = 1_000;

/**
 * Whether the VM's running QEMU is the installation now current for it, from /proc and the
 * identity recorded at launch. With `askQemu` (a refresh, about to act on it) the running QEMU's
 * own version is asked, briefly: the installation's probe may not be what runs. Reports never
 * ask: a hung QEMU must not slow them.
 */
export async function stalenessOf(core: VmCore, entry: VmEntry, target?: Installation, info?: InstallationInfo, askQemu = false): Promise<Staleness> {
  const { record } = entry;
  const installation = target ?? core.current(record);
  const current = { installation, info: info ?? (await core.options.probe(installation)) };
  let runningVersion: string | undefined;
  if (askQemu && entry.qmp && !entry.hung) {
    try {
      const { qemu } = await entry.qmp.queryVersion({ timeoutMs: LIVE_VERSION_TIMEOUT_MS });
      runningVersion = `${qemu.major}.${qemu.minor}.${qemu.micro}`;
    } catch {
      // The recorded version stands in.
    }
  }
  return assessStaleness({
    launched: { installation: record.installation.name, ...(record.binary ? { binary: record.binary } : {}) },
    // Hashed (once per binary) only when it is not the current file itself.
    exe: await exeOf(core.options.qemu, record, current.info.identity),
    current,
    ...(runningVersion === undefined ? {} : { runningVersion }),
  });
}
