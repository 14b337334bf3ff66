// vmkeepd's lines as structured entries in a real journald (systemd-journald running inside the
// private systemd, vmkeepd's stderr its stream): `journalctl -u vmkeepd VM=web1` returns exactly
// web1's lines, `-p warning` only warnings and errors, and the last line written before a
// service stop (SIGTERM to the whole control group) arrives. Negative controls: with perl made
// unreachable for the service, or the running helper SIGKILLed, every line still arrives
// (on the stream, with its priority), without a VM field, and the fallback is said once.
import { describe, expect, it } from 'vitest';
import { DAEMON_UNIT, DaemonHost } from '../support/daemon-host.js';
import { daemonHostsOfFile } from '../support/host-hooks.js';
import { waitFor } from '../support/systemd-host.js';

const { hosts, spec } = daemonHostsOfFile();

type Entry = Record<string, string | undefined>;
const FALLBACK_NOTICE = 'log lines go to stderr';

/** vmkeepd's journal entries (JSON output of journalctl inside), after `cursor` when given. */
async function journal(host: DaemonHost, args: string[] = [], cursor?: string): Promise<Entry[]> {
  const r = await host.host.exec('journalctl', ['--no-pager', '--all', '-o', 'json', '-u', DAEMON_UNIT, ...(cursor === undefined ? [] : [`--after-cursor=${cursor}`]), ...args]);
  if (r.exitCode !== 0) throw new Error(`journalctl ${args.join(' ')} failed (exit ${String(r.exitCode)}): ${r.stderr}`);
  return r.stdout.split('\n').filter((line) => line !== '').map((line) => JSON.parse(line) as Entry);
}

/** pino's level: the first in the line (a logged access level is a later `level` field). */
function levelOf(entry: Entry): number {
  return Number(/^\{"level":(\d+)/.exec(entry['VMKEEP_JSON'] ?? entry['MESSAGE'] ?? '')?.[1] ?? NaN);
}

/** The pino line behind an entry: its VMKEEP_JSON field, or a stream entry's message. */
function lineOf(entry: Entry): Record<string, unknown> | undefined {
  const text = entry['VMKEEP_JSON'] ?? entry['MESSAGE'];
  try {
    return text === undefined ? undefined : JSON.parse(text) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

async function stoppedLineArrives(host: DaemonHost, cursor?: string): Promise<Entry[]> {
  await host.stop();
  // journald reads its sockets on its own time: the last line is waited for.
  return waitFor('the line vmkeepd writes at its stop in the journal', 20_000, async () => {
    const entries = await journal(host, [], cursor);
    return entries.some((e) => lineOf(e)?.['msg'] === 'stopping vmkeepd; VMs keep running') ? entries : undefined;
  });
}

async function cursorNow(host: DaemonHost): Promise<string> {
  const r = await host.host.exec('journalctl', ['--no-pager', '-n', '0', '--show-cursor']);
  const cursor = /^-- cursor: (.+)$/m.exec(r.stdout)?.[1];
  if (cursor === undefined) throw new Error(`journalctl --show-cursor printed no cursor: ${r.stdout}${r.stderr}`);
  return cursor;
}

/** The host PID of vmkeepd's journal helper (perl in the service's cgroup). */
async function helperPid(host: DaemonHost): Promise<number> {
  const r = await host.host.exec('sh', ['-c', `for p in $(cat /sys/fs/cgroup/system.slice/${DAEMON_UNIT}/cgroup.procs); do [ "$(cat /proc/$p/comm)" = perl ] && echo $p; done; true`]);
  const inside = Number(r.stdout.trim().split('\n')[0]);
  const pid = Number.isInteger(inside) && inside > 0 ? host.host.hostPidOf(inside) : null;
  if (pid === null) throw new Error(`no perl helper in ${DAEMON_UNIT}'s cgroup: ${r.stdout}${r.stderr}`);
  return pid;
}

describe("vmkeepd's lines in a real journald", () => {
  it('VM=web1 returns exactly web1\'s lines, -p warning only warnings and errors, the line at the stop arrives', async () => {
    // QEMU as root: vmkeepd warns about it at every start. The VMs live in their scopes: a QEMU
    // holding the helper's pipe would keep it, and so the stop, waiting.
    const host = await DaemonHost.boot({ name: `jnl-${process.pid}`, journald: true, args: ['--qemu-user', 'root', '--allow-qemu-root'] });
    hosts.push(host);
    await host.api.create(spec('web1'));
    await host.api.create(spec('db1'));
    await host.api.stop('web1', { timeoutSec: 30 });
    const all = await stoppedLineArrives(host);
    // The helper ended at its stdin's end: a clean stop, nothing left for a final SIGKILL.
    expect((await host.systemctl('show', '--property=Result', '--value', DAEMON_UNIT)).trim()).toBe('success');

    // Every line of vmkeepd came over the native protocol, none over the stream.
    const native = all.filter((e) => e['VMKEEP_JSON'] !== undefined);
    expect(all.filter((e) => e['_TRANSPORT'] === 'stdout').map((e) => e['MESSAGE'])).toEqual([]);
    expect(native.every((e) => e['_TRANSPORT'] === 'journal' && e['SYSLOG_IDENTIFIER'] === 'vmkeepd')).toBe(true);
    expect(native.some((e) => lineOf(e)?.['msg'] === 'vmkeepd ready')).toBe(true);
    expect(all.some((e) => e['MESSAGE']?.includes(FALLBACK_NOTICE))).toBe(false);

    const web1 = native.filter((e) => lineOf(e)?.['vm'] === 'web1').map((e) => e['__CURSOR']);
    expect(web1.length).toBeGreaterThan(1);
    const byVm = await journal(host, ['VM=web1']);
    expect(byVm.map((e) => e['__CURSOR'])).toEqual(web1);
    expect(byVm.every((e) => e['VM'] === 'web1')).toBe(true);
    expect(native.some((e) => lineOf(e)?.['vm'] === 'db1')).toBe(true);

    const warnings = await journal(host, ['-p', 'warning']);
    expect(warnings.some((e) => e['MESSAGE']?.startsWith('QEMU runs as root'))).toBe(true);
    expect(warnings.every((e) => Number(e['PRIORITY']) <= 4 && levelOf(e) >= 40)).toBe(true);
    expect(warnings.map((e) => e['__CURSOR'])).toEqual(native.filter((e) => levelOf(e) >= 40).map((e) => e['__CURSOR']));
  }, 240_000);

  it('negative controls: perl out of reach, or the helper killed: every line arrives on the stream, with its priority, without VM', async () => {
    const host = await DaemonHost.boot({ name: `jnlf-${process.pid}`, journald: true, scopes: false });
    hosts.push(host);
    await host.stop();
    const perl = (await host.host.exec('sh', ['-c', 'readlink -f "$(command -v perl)"'])).stdout.trim();
    expect(perl).toMatch(/^\/.*perl/);
    await DaemonHost.dropIn(host.host, DAEMON_UNIT, 'test-no-perl.conf', `[Service]\nInaccessiblePaths=${perl}\n`);
    let cursor = await cursorNow(host);
    await host.start();
    await host.api.create(spec('web1'));
    let entries = await stoppedLineArrives(host, cursor);
    expect(entries.filter((e) => e['VMKEEP_JSON'] !== undefined)).toEqual([]);
    expect(entries.filter((e) => e['MESSAGE']?.includes(FALLBACK_NOTICE))).toHaveLength(1);
    expect((await journal(host, ['VM=web1'], cursor))).toEqual([]);
    const lines = entries.map(lineOf);
    expect(lines.every((line) => line !== undefined), entries.map((e) => e['MESSAGE']).join('\n')).toBe(true);
    expect(lines.map((line) => line?.['msg'])).toEqual(expect.arrayContaining(['vmkeepd ready', 'stopping vmkeepd; VMs keep running']));
    expect(lines.some((line) => line?.['vm'] === 'web1')).toBe(true);
    // The priority still comes from the `<N>` prefix.
    expect(entries.filter((e) => e['PRIORITY'] === '4').map((e) => levelOf(e))).toContain(40);
    const LEVEL_PRIORITY: Record<number, number> = { 30: 6, 40: 4, 50: 3 };
    expect(entries.filter((e) => Number(e['PRIORITY']) !== LEVEL_PRIORITY[levelOf(e)]).map((e) => `${e['PRIORITY']} ${e['MESSAGE']}`)).toEqual([]);

    // The helper SIGKILLed while vmkeepd runs: the lines after it arrive on the stream.
    await DaemonHost.dropIn(host.host, DAEMON_UNIT, 'test-no-perl.conf', '');
    cursor = await cursorNow(host);
    await host.start();
    process.kill(await helperPid(host), 'SIGKILL');
    await waitFor('the fallback notice after the helper was killed', 20_000, async () =>
      ((await journal(host, [], cursor)).some((e) => e['MESSAGE']?.includes(FALLBACK_NOTICE)) ? true : undefined));
    await host.api.create(spec('db1'));
    entries = await stoppedLineArrives(host, cursor);
    expect(entries.filter((e) => e['MESSAGE']?.includes(FALLBACK_NOTICE))).toHaveLength(1);
    const after = entries.slice(entries.findIndex((e) => e['MESSAGE']?.includes(FALLBACK_NOTICE)));
    expect(after.every((e) => e['_TRANSPORT'] === 'stdout' && e['VM'] === undefined)).toBe(true);
    expect(after.some((e) => lineOf(e)?.['vm'] === 'db1')).toBe(true);
    expect(entries.some((e) => e['VMKEEP_JSON'] !== undefined && lineOf(e)?.['msg'] === 'vmkeepd ready')).toBe(true);
  }, 240_000);
});
