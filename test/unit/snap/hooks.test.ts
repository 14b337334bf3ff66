// The snap's hooks and the service launcher, run by bash as snapd would run them, outside a snap:
// fake snapctl and node on PATH, SNAP/SNAP_COMMON/SNAP_REVISION in a temp folder (sandbox.ts).
import { mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { main } from '../../../cli/index.js';
import { parseInstallationsConfig, REFRESH_STRATEGIES } from '../../../upgrade/index.js';
import { makeSandbox, SNAP_DIR, type Sandbox } from './sandbox.js';

let box: Sandbox;

beforeEach(async () => {
  box = await makeSandbox('12');
});

afterEach(async () => {
  await box.cleanup();
});

const STRATEGY_ERROR = (got: string) =>
  `vmkeep: refresh.strategy must be one of manual, migrate, migrate-or-reboot, reboot, on-guest-shutdown, cpr, auto; got ${got}. Fix: snap set vmkeep refresh.strategy=migrate`;
const TIMEOUT_ERROR = (got: string) =>
  `vmkeep: shutdown.timeout must be a whole number of seconds from 1 to 1500; got ${got}. Fix: snap set vmkeep shutdown.timeout=60`;

describe('the strategy names in the shell scripts', () => {
  // bash cannot import upgrade/policy.ts: its one copy is held to the list here.
  it('are REFRESH_STRATEGIES in snap/local/vmkeep-strategies.bash', async () => {
    const file = await readFile(join(SNAP_DIR, 'local/vmkeep-strategies.bash'), 'utf8');
    const inFile = /^VMKEEP_STRATEGIES=\(([^)]*)\)$/m.exec(file)?.[1]?.split(' ');
    expect(inFile?.sort()).toEqual([...REFRESH_STRATEGIES].sort());
  });

  it('are in no other script of the snap', async () => {
    const scripts = [
      ...(await readdir(join(SNAP_DIR, 'hooks'))).map((f) => `hooks/${f}`),
      ...(await readdir(join(SNAP_DIR, 'local'))).map((f) => `local/${f}`),
    ].filter((f) => f !== 'local/vmkeep-strategies.bash');
    for (const script of scripts) {
      // Code only: comments may name a few strategies to explain an option.
      const code = (await readFile(join(SNAP_DIR, script), 'utf8')).split('\n').filter((line) => !/^\s*#/.test(line)).join('\n');
      expect(code, `snap/${script}`).not.toMatch(/on-guest-shutdown|migrate-or-reboot/);
    }
  });
});

describe('configure hook', () => {
  it.each<Record<string, string>>([
    { 'refresh.strategy': 'manual', 'shutdown.timeout': '60' },
    { 'refresh.strategy': 'migrate', 'shutdown.timeout': '1' },
    { 'refresh.strategy': 'reboot', 'shutdown.timeout': '1500' },
    { 'refresh.strategy': 'on-guest-shutdown', 'shutdown.timeout': '120' },
    {},
  ])('accepts %o', async (options) => {
    await box.setOptions(options);
    const result = await box.run('hooks/configure');
    expect(result).toMatchObject({ exitCode: 0, stderr: '' });
  });

  it.each(['fast', 'Migrate', 'migrate ', 'live'])('refuses refresh.strategy=%j with the values and the fix', async (bad) => {
    await box.setOptions({ 'refresh.strategy': bad, 'shutdown.timeout': '60' });
    const result = await box.run('hooks/configure');
    expect(result.exitCode).toBe(1);
    expect(result.stderr.trim()).toBe(STRATEGY_ERROR(bad));
  });

  it.each(['0', '-5', 'abc', '1.5', '1501', '3600', '60s', '007', '99999999999999999999999'])(
    'refuses shutdown.timeout=%j with the range and the fix',
    async (bad) => {
      await box.setOptions({ 'refresh.strategy': 'manual', 'shutdown.timeout': bad });
      const result = await box.run('hooks/configure');
      expect(result.exitCode).toBe(1);
      expect(result.stderr.trim()).toBe(TIMEOUT_ERROR(bad));
    },
  );

  it('restarts a running vmkeepd when refresh.strategy differs from what it started with', async () => {
    await writeFile(join(box.common, 'vmkeepd-options'), 'refresh.strategy=manual\n');
    await box.setOptions({ 'refresh.strategy': 'migrate', 'shutdown.timeout': '60' });
    const result = await box.run('hooks/configure', { FAKE_SERVICE_STATE: 'active' });
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('refresh.strategy is now migrate (was manual)');
    expect(await box.snapctlCalls()).toContain('restart vmkeep.vmkeepd');
  });

  it.each([
    { what: 'the daemon started with the same strategy', startedWith: 'migrate', state: 'active' },
    { what: 'the operator stopped the daemon', startedWith: 'manual', state: 'inactive' },
    { what: 'the daemon never ran', startedWith: undefined, state: 'active' },
  ])('does not restart vmkeepd when $what', async ({ startedWith, state }) => {
    if (startedWith !== undefined) await writeFile(join(box.common, 'vmkeepd-options'), `refresh.strategy=${startedWith}\n`);
    await box.setOptions({ 'refresh.strategy': 'migrate', 'shutdown.timeout': '60' });
    const result = await box.run('hooks/configure', { FAKE_SERVICE_STATE: state });
    expect(result).toMatchObject({ exitCode: 0, stderr: '' });
    expect((await box.snapctlCalls()).filter((call) => call.startsWith('restart'))).toEqual([]);
  });
});

describe('configure hook: QEMU\'s user snap_daemon in the kvm group', () => {
  it('adds snap_daemon to the kvm group when it is not in it', async () => {
    const result = await box.run('hooks/configure', { FAKE_SNAP_DAEMON_GROUPS: 'snap_daemon' });
    expect(result).toMatchObject({ exitCode: 0, stderr: '' });
    expect(await box.usermodCalls()).toEqual(['--append --groups kvm snap_daemon']);
  });

  it('changes nothing when snap_daemon is in it already, or the host has no kvm group', async () => {
    expect(await box.run('hooks/configure')).toMatchObject({ exitCode: 0, stderr: '' });
    expect(await box.run('hooks/configure', { FAKE_KVM_GROUP: 'no', FAKE_SNAP_DAEMON_GROUPS: 'snap_daemon' })).toMatchObject({ exitCode: 0, stderr: '' });
    expect(await box.usermodCalls()).toEqual([]);
  });

  it('a failing usermod is reported with the fix and refuses nothing (only KVM is lost)', async () => {
    const result = await box.run('hooks/configure', { FAKE_SNAP_DAEMON_GROUPS: 'snap_daemon', FAKE_USERMOD_STATUS: '1' });
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('Fix: usermod --append --groups kvm snap_daemon');
  });
});

describe('vmkeepd-wake (the configure hook and the guests service at boot)', () => {
  const START = 'start --no-block snap.vmkeep.vmkeepd.service';

  it('the configure hook starts vmkeepd without waiting for it: snapd started only its socket', async () => {
    const result = await box.run('hooks/configure');
    expect(result).toMatchObject({ exitCode: 0, stderr: '' });
    expect(await box.systemctlCalls()).toEqual(['is-active --quiet snap.vmkeep.vmkeepd.control.socket', START]);
  });

  it('the guests service starts vmkeepd at boot, and exits 0', async () => {
    const result = await box.run('local/vmkeep-guests');
    expect(result).toMatchObject({ exitCode: 0, stderr: '' });
    expect(await box.systemctlCalls()).toContain(START);
  });

  it('leaves vmkeepd stopped when its socket was stopped on purpose, saying how to start it', async () => {
    const result = await box.run('hooks/configure', { FAKE_SOCKET_STATE: 'inactive' });
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('vmkeepd left stopped. Start both with: snap start vmkeep.vmkeepd');
    expect(await box.systemctlCalls()).not.toContain(START);
  });

  it('never fails its caller: a refused start is said, the guests service still comes up', async () => {
    const result = await box.run('local/vmkeep-guests', { FAKE_SYSTEMCTL_STATUS: '1' });
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('it starts at the first connection to its socket');
  });
});

describe('install hook', () => {
  it('sets the defaults when the options are unset', async () => {
    const result = await box.run('hooks/install');
    expect(result.exitCode).toBe(0);
    expect(await box.options()).toEqual({ 'refresh.strategy': 'manual', 'shutdown.timeout': '60' });
  });

  it('keeps values already set (e.g. gadget defaults)', async () => {
    await box.setOptions({ 'refresh.strategy': 'migrate', 'shutdown.timeout': '300' });
    const result = await box.run('hooks/install');
    expect(result.exitCode).toBe(0);
    expect(await box.options()).toEqual({ 'refresh.strategy': 'migrate', 'shutdown.timeout': '300' });
    expect((await box.snapctlCalls()).filter((call) => call.startsWith('set'))).toEqual([]);
  });

  it('sets only the missing one', async () => {
    await box.setOptions({ 'shutdown.timeout': '300' });
    expect((await box.run('hooks/install')).exitCode).toBe(0);
    expect(await box.options()).toEqual({ 'refresh.strategy': 'manual', 'shutdown.timeout': '300' });
  });

  it('leaves values the configure hook accepts', async () => {
    expect((await box.run('hooks/install')).exitCode).toBe(0);
    expect((await box.run('hooks/configure')).exitCode).toBe(0);
  });
});

/** What the launcher should list for a revision rooted at `root`. */
function installationAt(name: string, root: string) {
  return {
    name,
    binary: join(root, 'usr/bin/qemu-system-x86_64'),
    moduleDir: join(root, 'usr/lib/x86_64-linux-gnu/qemu'),
    firmwareDirs: [join(root, 'usr/share/qemu'), join(root, 'usr/share/seabios'), join(root, 'usr/lib/ipxe/qemu')],
  };
}

async function readInstallations(box: Sandbox) {
  const file = join(box.common, 'installations.json');
  return parseInstallationsConfig(await readFile(file, 'utf8'), file);
}

describe('vmkeepd launcher', () => {
  it('makes this revision current, keeps an older revision still installed, drops one snapd removed', async () => {
    const rev11 = await box.addRevision('11');
    await mkdir(join(box.revisions, '9')); // a revision folder without its QEMU: not an installation
    await symlink('12', join(box.revisions, 'current'));
    // What the launcher of revision 11 wrote; revision 10 has been discarded since.
    await writeFile(
      join(box.common, 'installations.json'),
      JSON.stringify({ installations: [installationAt('rev-10', join(box.revisions, '10')), installationAt('rev-11', rev11)], current: { default: 'rev-11' } }),
    );
    await box.setOptions({ 'refresh.strategy': 'migrate' });

    const result = await box.run('local/vmkeepd-launch');

    expect(result.exitCode).toBe(0);
    expect(await readInstallations(box)).toEqual({
      installations: [installationAt('rev-12', box.snap), installationAt('rev-11', rev11)],
      current: { default: 'rev-12' },
    });
    expect(result.stderr).toContain('older revisions still installed: rev-11; refresh.strategy=migrate');
    // Written by temp file and rename: nothing else is left in $SNAP_COMMON.
    expect((await readdir(box.common)).sort()).toEqual(['installations.json', 'vmkeepd-options']);
    expect(await readFile(join(box.common, 'vmkeepd-options'), 'utf8')).toBe('refresh.strategy=migrate\n');
  });

  it('execs vmkeepd with the state in $SNAP_COMMON, the installations file and the refresh policy', async () => {
    await box.setOptions({ 'refresh.strategy': 'reboot' });
    expect((await box.run('local/vmkeepd-launch')).exitCode).toBe(0);
    expect(await box.nodeCalls()).toEqual([
      [
        join(box.snap, 'lib/vmkeep/dist/cli/vmkeepd.js'),
        '--state-dir', join(box.common, 'state'),
        '--runtime-dir', '/run/vmkeep',
        '--log-dir', join(box.common, 'log'),
        '--socket', join(box.common, 'vmkeep.sock'),
        '--installations', join(box.common, 'installations.json'),
        '--refresh-policy', 'reboot',
        '--refresh-at-start',
        '--guests-unit', 'snap.vmkeep.guests.service',
      ],
    ]);
  });

  it('starts with manual when refresh.strategy is unset', async () => {
    expect((await box.run('local/vmkeepd-launch')).exitCode).toBe(0);
    const [argv] = await box.nodeCalls();
    expect(argv?.[argv.indexOf('--refresh-policy') + 1]).toBe('manual');
  });

  it('starts with manual, and says so, when refresh.strategy holds a value configure would refuse', async () => {
    await box.setOptions({ 'refresh.strategy': 'yolo' });
    const result = await box.run('local/vmkeepd-launch');
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('refresh.strategy=yolo is not one of manual, migrate, migrate-or-reboot, reboot, on-guest-shutdown, cpr, auto; starting with manual');
    const [argv] = await box.nodeCalls();
    expect(argv?.[argv.indexOf('--refresh-policy') + 1]).toBe('manual');
  });

  it('still starts vmkeepd, with manual, when snapctl fails', async () => {
    const result = await box.run('local/vmkeepd-launch', { FAKE_SNAPCTL_FAIL: '1' });
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('cannot read refresh.strategy (snapctl failed); starting with manual');
    const [argv] = await box.nodeCalls();
    expect(argv?.[argv.indexOf('--refresh-policy') + 1]).toBe('manual');
  });

  it('names a local revision (x1) validly and lists only itself on a fresh install', async () => {
    const local = await makeSandbox('x1');
    try {
      expect((await local.run('local/vmkeepd-launch')).exitCode).toBe(0);
      expect(await readInstallations(local)).toEqual({ installations: [installationAt('rev-x1', local.snap)], current: { default: 'rev-x1' } });
    } finally {
      await local.cleanup();
    }
  });

  it('refuses to run outside a snap', async () => {
    const result = await box.run('local/vmkeepd-launch', { SNAP_COMMON: '' });
    expect(result.exitCode).not.toBe(0);
    expect(result.stderr).toContain('SNAP_COMMON');
    expect(await box.nodeCalls()).toEqual([]);
  });

  it('passes only flags vmkeepd knows', async () => {
    await box.setOptions({ 'refresh.strategy': 'migrate' });
    expect((await box.run('local/vmkeepd-launch')).exitCode).toBe(0);
    const [argv] = await box.nodeCalls();
    const help = await helpOf(['daemon']);
    for (const flag of (argv ?? []).filter((arg) => arg.startsWith('--'))) expect(help, `vmkeep daemon --help names ${flag}`).toContain(flag);
  });
});

describe('post-refresh hook', () => {
  it('reports the revision it came from and that vmkeepd applies the policy at its start', async () => {
    await writeFile(
      join(box.common, 'installations.json'),
      JSON.stringify({ installations: [installationAt('rev-11', join(box.revisions, '11'))], current: { default: 'rev-11' } }, null, 2),
    );
    await box.setOptions({ 'refresh.strategy': 'migrate' });
    const result = await box.run('hooks/post-refresh');
    expect(result.exitCode).toBe(0);
    expect(result.stdout).toContain('refreshed from revision 11 to 12');
    expect(result.stdout).toContain('vmkeepd applies refresh.strategy=migrate to them when it starts');
  });

  it('exits 0 when it cannot tell (no installations file, snapctl failing)', async () => {
    const result = await box.run('hooks/post-refresh', { FAKE_SNAPCTL_FAIL: '1' });
    expect(result.exitCode).toBe(0);
    expect(result.stdout).toContain('refreshed from revision unknown to 12');
  });
});

describe('remove hook', () => {
  const stopArgv = (timeout: string) => [
    join(box.snap, 'lib/vmkeep/dist/cli/main.js'),
    'stop', '--all',
    '--timeout', timeout,
    '--state-dir', join(box.common, 'state'),
    '--socket', join(box.common, 'vmkeep.sock'),
  ];

  async function addRecords(...names: string[]): Promise<void> {
    await mkdir(join(box.common, 'state', 'vms'), { recursive: true });
    for (const name of names) await writeFile(join(box.common, 'state', 'vms', `${name}.json`), '{}');
  }

  it('does nothing without VM records', async () => {
    const result = await box.run('hooks/remove');
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain(`no VM records in ${join(box.common, 'state')}; no guest to power off`);
    expect(await box.nodeCalls()).toEqual([]);
  });

  it('does nothing when the records folder holds no record', async () => {
    await mkdir(join(box.common, 'state', 'vms'), { recursive: true });
    await writeFile(join(box.common, 'state', 'vms', 'web1.json.tmp'), '{}');
    const result = await box.run('hooks/remove');
    expect(result.exitCode).toBe(0);
    expect(result.stderr).toContain('no VM records');
    expect(await box.nodeCalls()).toEqual([]);
  });

  it('runs only `vmkeep stop --all` with shutdown.timeout, the state folder and the main socket (no vmkeepd started)', async () => {
    await addRecords('web1', 'db1');
    await box.setOptions({ 'shutdown.timeout': '90' });
    const result = await box.run('hooks/remove');
    expect(result.exitCode).toBe(0);
    expect(await box.nodeCalls()).toEqual([stopArgv('90')]);
  });

  it.each<{ what: string; options: Record<string, string> }>([
    { what: 'unset', options: {} },
    { what: 'out of range', options: { 'shutdown.timeout': '1501' } },
    { what: 'not a number', options: { 'shutdown.timeout': '60s' } },
    { what: 'zero', options: { 'shutdown.timeout': '0' } },
  ])('gives the guests 60 s when shutdown.timeout is $what', async ({ options }) => {
    await addRecords('web1');
    await box.setOptions(options);
    expect((await box.run('hooks/remove')).exitCode).toBe(0);
    expect(await box.nodeCalls()).toEqual([stopArgv('60')]);
  });

  it('accepts shutdown.timeout=1500, the highest configure allows', async () => {
    await addRecords('web1');
    await box.setOptions({ 'shutdown.timeout': '1500' });
    expect((await box.run('hooks/remove')).exitCode).toBe(0);
    expect(await box.nodeCalls()).toEqual([stopArgv('1500')]);
  });

  it('gives the guests 60 s, and still powers them off, when snapctl fails', async () => {
    await addRecords('web1');
    await box.setOptions({ 'shutdown.timeout': '300' });
    const result = await box.run('hooks/remove', { FAKE_SNAPCTL_FAIL: '1' });
    expect(result.exitCode).toBe(0);
    expect(await box.snapctlCalls()).toEqual(['get shutdown.timeout']);
    expect(await box.nodeCalls()).toEqual([stopArgv('60')]);
    expect(result.stderr).toContain('every guest powered off');
  });

  it.each([
    { status: '0', message: 'vmkeep remove: every guest powered off' },
    {
      status: '3',
      message:
        'vmkeep remove: some guests did not power off within 45 s and are left RUNNING on a QEMU of the removed snap (named above); power them off from inside, or raise shutdown.timeout before removing',
    },
    { status: '1', message: 'vmkeep remove: some guests could not be asked to power off (status 1, see above); they are left running' },
  ])('exits 0 and reports stop exiting $status', async ({ status, message }) => {
    await addRecords('web1');
    await box.setOptions({ 'shutdown.timeout': '45' });
    const result = await box.run('hooks/remove', { FAKE_STOP_STATUS: status });
    expect(result.exitCode).toBe(0);
    expect(result.stderr.trim().split('\n')).toEqual([message]);
  });

  it('calls the CLI only with options `vmkeep stop` knows', async () => {
    const help = await helpOf(['stop']);
    for (const flag of ['--all', '--timeout', '--state-dir', '--socket']) expect(help, `vmkeep stop --help names ${flag}`).toContain(flag);
  });
});

/** `vmkeep COMMAND --help`, in-process (no daemon needed). */
async function helpOf(command: string[]): Promise<string> {
  let text = '';
  const sink = () =>
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        text += chunk.toString('utf8');
        callback();
      },
    });
  const code = await main([...command, '--help'], { stdout: sink(), stderr: sink(), env: {}, onSignal: () => () => {} });
  expect(code, `vmkeep ${command.join(' ')} --help exits 0`).toBe(0);
  return text;
}
