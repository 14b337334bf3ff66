// The vmkeep daemon commands, in-process, against a real control API over a fake DaemonOps.
import { appendFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { ApiClient, DaemonError } from '../../../daemon/index.js';
import { startApiServer } from '../../../daemon/api-server.js';
import { FakeDaemonOps } from '../daemon/fake-ops.js';
import { within } from '../qmp/fake-peer.js';
import { useCliHarness } from './harness.js';

const cli = useCliHarness('vmkeep-cli-');
let dir: string;
let socketPath: string;
let ops: FakeDaemonOps;
beforeEach(() => {
  ({ dir, socketPath, ops } = cli);
});
const { start, vmkeep } = cli;

describe('list and status', () => {
  it('list prints a table of the VMs', async () => {
    ops.addVm('web1', 'running');
    ops.addVm('db', 'stopped');
    const { code, stdout, stderr } = await vmkeep(['list']);
    expect(code).toBe(0);
    expect(stderr).toBe('');
    expect(stdout).toBe(
      [
        'NAME  STATE    PID   QEMU    MACHINE     SCOPE',
        'web1  running  4000  7.2.19  pc-q35-7.2  vmkeep-web1.scope',
        'db    stopped  -     -       pc-q35-7.2  -',
        '',
      ].join('\n'),
    );
  });

  it('list --json prints exactly one JSON document: the VmView array', async () => {
    ops.addVm('web1', 'running');
    const { code, stdout } = await vmkeep(['list', '--json']);
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toEqual([...ops.vms.values()]);
  });

  it('list with no VMs prints nothing on stdout and the next step on stderr', async () => {
    const { code, stdout, stderr } = await vmkeep(['list']);
    expect(code).toBe(0);
    expect(stdout).toBe('');
    expect(stderr).toContain('vmkeep create SPEC.json');
    expect((await vmkeep(['list', '--json'])).stdout).toBe('[]\n');
  });

  it('status prints key: value lines, --json the VmView', async () => {
    ops.addVm('web1', 'unreachable', { pid: 77, problem: 'the monitor does not answer' });
    const { code, stdout } = await vmkeep(['status', 'web1']);
    expect(code).toBe(0);
    expect(stdout).toContain('name:         web1\n');
    expect(stdout).toContain('state:        unreachable\n');
    expect(stdout).toContain('problem:      the monitor does not answer\n');
    expect(stdout).toContain('pid:          77\n');
    expect(stdout).toContain('memory:       256 MiB\n');
    const json = await vmkeep(['status', 'web1', '--json']);
    expect(JSON.parse(json.stdout)).toEqual(ops.vms.get('web1'));
  });
});

describe('changing VMs', () => {
  it('create sends the spec file and reports the VM', async () => {
    const specPath = join(dir, 'web1.json');
    await writeFile(specPath, JSON.stringify({ name: 'web1', kernel: '/boot/vmlinuz', memoryMiB: 512 }));
    const { code, stdout } = await vmkeep(['create', specPath]);
    expect(code).toBe(0);
    expect(stdout).toBe('web1: created, running, pid 4000\n');
    expect(ops.calls).toEqual([{ op: 'create', args: [{ name: 'web1', kernel: '/boot/vmlinuz', memoryMiB: 512 }, { start: true }] }]);
    expect(ops.vms.get('web1')?.spec.memoryMiB).toBe(512);
  });

  it('create --no-start only creates it', async () => {
    const specPath = join(dir, 'db.json');
    await writeFile(specPath, JSON.stringify({ name: 'db', kernel: '/boot/vmlinuz' }));
    const { code, stdout } = await vmkeep(['create', specPath, '--no-start', '--json']);
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toMatchObject({ name: 'db', state: 'stopped' });
    expect(ops.calls[0]?.args[1]).toEqual({ start: false });
  });

  it('start, stop --force --timeout and delete', async () => {
    ops.addVm('web1', 'stopped');
    expect(await vmkeep(['start', 'web1'])).toMatchObject({ code: 0, stdout: 'web1: running, pid 4000\n' });
    const stopped = await vmkeep(['stop', 'web1', '--force', '--timeout', '5']);
    expect(stopped).toMatchObject({ code: 0, stdout: 'web1: stopped\n' });
    expect(ops.calls.find((c) => c.op === 'stop')?.args).toEqual(['web1', { timeoutSec: 5, force: true }]);
    expect(await vmkeep(['delete', 'web1', '--json'])).toMatchObject({ code: 0, stdout: '{"deleted":"web1"}\n' });
    expect(ops.vms.size).toBe(0);
  });

  it('disk accept records the chains and prints them, top first; --json the result', async () => {
    ops.addVm('web1', 'stopped');
    const { code, stdout } = await vmkeep(['disk', 'accept', 'web1']);
    expect(code).toBe(0);
    expect(stdout).toBe('web1: accepted the chains of its disks (top first):\n  disks[0]: /vm/web.qcow2 (qcow2) <- /vm/base.raw (raw)\n');
    expect(ops.calls.find((c) => c.op === 'acceptDisks')?.args).toEqual(['web1']);
    expect(JSON.parse((await vmkeep(['disk', 'accept', 'web1', '--json'])).stdout)).toMatchObject({ vm: 'web1', previous: null });
    expect((await vmkeep(['disk', 'forget', 'web1'])).code).toBe(2);
  });

  it('qmp prints the return value as JSON', async () => {
    ops.addVm('web1', 'running');
    ops.qmpReplies.set('query-status', { status: 'running', running: true });
    const { code, stdout } = await vmkeep(['qmp', 'web1', 'query-status']);
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toEqual({ status: 'running', running: true });
    await vmkeep(['qmp', 'web1', 'human-monitor-command', '{"command-line":"info status"}']);
    expect(ops.calls.at(-1)?.args).toEqual(['web1', 'human-monitor-command', { 'command-line': 'info status' }]);
  });
});

describe('operations', () => {
  const FIRST = '00000000-0000-4000-8000-000000000001';

  it('start --async prints the operation id and returns; operations ID --wait waits and shows how it ended', async () => {
    ops.addVm('web1', 'stopped');
    expect(await vmkeep(['start', 'web1', '--async'])).toMatchObject({ code: 0, stdout: `${FIRST}\n` });
    const waited = await vmkeep(['operations', FIRST, '--wait']);
    expect(waited).toMatchObject({ code: 0, stdout: `${FIRST}: start of web1: succeeded\n` });
    const listed = await vmkeep(['operations']);
    expect(listed.stdout).toMatch(new RegExp(`^ID +KIND +VMS +STATUS +PROGRESS +BY +UPDATED\n${FIRST} +start +web1 +succeeded +- +admin +\\S+\n$`));
    expect(JSON.parse((await vmkeep(['operations', '--json'])).stdout)).toEqual([expect.objectContaining({ id: FIRST, kind: 'start', status: 'succeeded' })]);
  });

  it('stop --async --json prints the operation; a failed one makes operations --wait exit 1 with its error', async () => {
    ops.addVm('web1', 'running');
    ops.stopFailures.set('web1', new DaemonError('STOP_TIMEOUT', 'the guest did not power off within 5 s'));
    const started = await vmkeep(['stop', 'web1', '--async', '--json']);
    expect(JSON.parse(started.stdout)).toMatchObject({ id: FIRST, kind: 'stop', vms: ['web1'] });
    const waited = await vmkeep(['operations', FIRST, '--wait']);
    expect(waited.code).toBe(1);
    expect(waited.stdout).toBe(`${FIRST}: stop of web1: failed\n[STOP_TIMEOUT] the guest did not power off within 5 s\n`);
  });

  it('--cancel of a stop: the reason, exit 1; --wait needs an id', async () => {
    ops.addVm('web1', 'running');
    ops.holdStops = new Promise(() => undefined);
    await vmkeep(['stop', 'web1', '--async']);
    const refused = await vmkeep(['operations', FIRST, '--cancel']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('a stop cannot be cancelled');
    expect((await vmkeep(['operations', '--wait'])).stderr).toContain('--wait and --cancel need an operation id');
  });
});

describe('streams', () => {
  it('logs prints the console; logs -f follows it until Ctrl-C', async () => {
    ops.addVm('web1', 'running');
    const log = join(dir, 'web1.log');
    await writeFile(log, 'boot\n');
    expect(await vmkeep(['logs', 'web1'])).toMatchObject({ code: 0, stdout: 'boot\n' });

    const follow = start(['logs', 'web1', '-f']);
    await follow.stdout.until('boot\n');
    await appendFile(log, 'login: ');
    await follow.stdout.until('login: ');
    follow.signal();
    expect(await follow.exit).toBe(0);
    expect(follow.stdout.text).toBe('boot\nlogin: ');
  });

  it('logs -f follows on across a vmkeepd restart, without repeating what it printed', async () => {
    ops.addVm('web1', 'running');
    const log = join(dir, 'web1.log');
    await writeFile(log, 'boot\n');
    const follow = start(['logs', 'web1', '-f']);
    await follow.stdout.until('boot\n');
    // vmkeepd stops (its streams end), the guest writes on meanwhile, vmkeepd is back.
    await cli.server.close();
    await follow.stderr.until('vmkeepd went away');
    await appendFile(log, 'tick 1\n');
    cli.server = await startApiServer({ socketPath, ops, operations: ops.operations });
    await follow.stdout.until('tick 1\n');
    await follow.stderr.until('vmkeepd is back');
    await appendFile(log, 'tick 2\n');
    await follow.stdout.until('tick 2\n');
    follow.signal();
    expect(await follow.exit).toBe(0);
    expect(follow.stdout.text).toBe('boot\ntick 1\ntick 2\n');
  });

  it('events --json prints one event per line until Ctrl-C', async () => {
    const events = start(['events', '--json']);
    await within(ops.listenerCountReaches(1), 3000, 'the CLI to subscribe');
    ops.emit({ type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting' });
    ops.emit({ type: 'vm-deleted', vm: 'db' });
    await events.stdout.until('vm-deleted');
    events.signal();
    expect(await events.exit).toBe(0);
    const lines = events.stdout.text.trim().split('\n').map((l) => JSON.parse(l));
    expect(lines).toMatchObject([{ type: 'vm-state', vm: 'web1', state: 'running' }, { type: 'vm-deleted', vm: 'db' }]);
    await within(ops.listenerCountReaches(0), 3000, 'the subscription to end');
  });

  it('events prints one human line per event', async () => {
    const events = start(['events']);
    await within(ops.listenerCountReaches(1), 3000, 'the CLI to subscribe');
    ops.emit({ type: 'vm-state', vm: 'web1', state: 'running', previous: 'starting' });
    await events.stdout.until('\n');
    events.signal();
    expect(await events.exit).toBe(0);
    expect(events.stdout.text).toMatch(/^\d{4}-\d\d-\d\dT[\d:.]+Z {2}web1 {2}starting -> running\n$/);
  });
});

describe('errors and exit codes', () => {
  it('a daemon error prints its code and message and exits 1; --json prints it as the one document', async () => {
    const human = await vmkeep(['status', 'nope']);
    expect(human.code).toBe(1);
    expect(human.stdout).toBe('');
    expect(human.stderr).toBe('vmkeep: error [NOT_FOUND]: no VM named "nope"; see vmkeep list\n');
    const json = await vmkeep(['status', 'nope', '--json']);
    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({ type: 'error', code: 'NOT_FOUND' });
  });

  it('an invalid spec is refused by the daemon with every problem, exit 1', async () => {
    const specPath = join(dir, 'bad.json');
    await writeFile(specPath, JSON.stringify({ name: 'Web 1', vcpus: 0 }));
    const { code, stderr } = await vmkeep(['create', specPath]);
    expect(code).toBe(1);
    expect(stderr).toMatch(/^vmkeep: error \[INVALID_SPEC\]: invalid VM spec \(\d problems\)/);
    expect(stderr).toContain('vcpus');
  });

  it('an unreadable or non-JSON spec file fails before the daemon is asked', async () => {
    expect(await vmkeep(['create', join(dir, 'missing.json')])).toMatchObject({ code: 1, stderr: expect.stringContaining('[SPEC_UNREADABLE]') });
    await writeFile(join(dir, 'broken.json'), '{ name: ');
    expect(await vmkeep(['create', join(dir, 'broken.json')])).toMatchObject({ code: 1, stderr: expect.stringContaining('[SPEC_NOT_JSON]') });
    expect(ops.calls).toEqual([]);
  });

  it.each([
    [['status'], 'Not enough non-option arguments'],
    [['status', 'Web/1'], 'is not a valid VM name'],
    [['stop', 'web1', '--timeout', '-3'], '--timeout must be a positive number'],
    [['qmp', 'web1', 'query-status', '[1]'], 'must be a JSON object'],
    [['frobnicate'], 'Unknown argument'],
  ])('usage error %j exits 2 and asks nothing of the daemon', async (args, message) => {
    const { code, stderr } = await vmkeep(args);
    expect(code).toBe(2);
    expect(stderr).toContain(message);
    expect(ops.calls).toEqual([]);
  });

  it('no daemon on the socket: DAEMON_DOWN with how to start it, exit 1', async () => {
    const missing = join(dir, 'nothing-here.sock');
    const { code, stdout, stderr } = await vmkeep(['list', '--socket', missing], { socket: false });
    expect(code).toBe(1);
    expect(stdout).toBe('');
    expect(stderr).toBe(
      `vmkeep: error [DAEMON_DOWN]: vmkeepd is not running (no answer on ${missing}): start it with \`systemctl start vmkeepd\` or \`vmkeep daemon\`, or point --socket / VMKEEP_SOCKET at it\n`,
    );
    // A socket file left behind by a dead daemon (connection refused) is the same case.
    await cli.server.close();
    const { rename } = await import('node:fs/promises');
    const { createServer } = await import('node:net');
    const old = createServer();
    await new Promise<void>((resolve) => old.listen(join(dir, 'tmp.sock'), resolve));
    await rename(join(dir, 'tmp.sock'), socketPath);
    await new Promise<void>((resolve) => old.close(() => resolve()));
    cli.server = await startApiServer({ socketPath: join(dir, 'other.sock'), ops, operations: ops.operations });
    expect(await vmkeep(['list', '--json'])).toMatchObject({ code: 1, stdout: expect.stringContaining('"code":"DAEMON_DOWN"') });
  });

  it('VMKEEP_* variables of other commands (or of a unit) are ignored; an unknown option typed is refused', async () => {
    ops.addVm('web1', 'running');
    // The parser reads the process environment itself.
    const saved = { qemu: process.env.VMKEEP_QEMU, timeout: process.env.VMKEEP_SHUTDOWN_TIMEOUT };
    process.env.VMKEEP_QEMU = '/opt/qemu/bin/qemu-system-x86_64';
    process.env.VMKEEP_SHUTDOWN_TIMEOUT = '60';
    try {
      expect(await vmkeep(['list'])).toMatchObject({ code: 0, stderr: '' });
      expect(await vmkeep(['list', '--qemu', '/x'])).toMatchObject({ code: 2, stderr: expect.stringContaining('Unknown argument: qemu') });
    } finally {
      for (const [key, value] of [['VMKEEP_QEMU', saved.qemu], ['VMKEEP_SHUTDOWN_TIMEOUT', saved.timeout]] as const) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
    }
  });

  it('the socket comes from VMKEEP_SOCKET when --socket is not given', async () => {
    ops.addVm('web1', 'running');
    const asked: string[] = [];
    const { code, stdout } = await vmkeep(['list', '--json'], {
      socket: false,
      env: { VMKEEP_SOCKET: socketPath },
      io: {
        createApiClient: (path) => {
          asked.push(path);
          return new ApiClient({ socketPath: path });
        },
      },
    });
    expect(code).toBe(0);
    expect(asked).toEqual([socketPath]);
    expect(JSON.parse(stdout)).toHaveLength(1);
  });

  it('completion prints the shell completion script', async () => {
    const { code, stdout } = await vmkeep(['completion'], { socket: false });
    expect(code).toBe(0);
    expect(stdout).toContain('###-begin-vmkeep-completions-###');
  });
});
