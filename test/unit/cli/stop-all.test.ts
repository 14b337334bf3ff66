// `vmkeep stop --all` (what vmkeep-guests.service runs at host shutdown), in-process against a
// real control API over a fake DaemonOps; and that `stop NAME` kept its behaviour.
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { DaemonError, type StopOptions, type VmView } from '../../../daemon/index.js';
import { FakeDaemonOps } from '../daemon/fake-ops.js';
import { within } from '../qmp/fake-peer.js';
import { useCliHarness } from './harness.js';

const cli = useCliHarness('vmkeep-stop-');
let dir: string;
let socketPath: string;
let ops: FakeDaemonOps;
beforeEach(() => {
  ({ dir, socketPath, ops } = cli);
});

async function vmkeep(args: string[], socket = socketPath) {
  return cli.vmkeep(args, { socket });
}

const stopCalls = () => ops.calls.filter((c) => c.op === 'stop');
const deafTimeout = (seconds: number) =>
  new DaemonError('STOP_TIMEOUT', `deaf did not power off within ${seconds} s of the ACPI request and is still running`);

describe('stop --all', () => {
  it('with vmkeepd down and --state-dir, goes to the records under the daemon lock (none here: nothing to do)', async () => {
    const stateDir = join(dir, 'state');
    const down = join(dir, 'nobody.sock');
    const { code, stderr } = await vmkeep(['stop', '--all', '--timeout', '5', '--state-dir', stateDir], down);
    expect(code).toBe(0);
    expect(stderr).toContain(`no vmkeepd runs on ${stateDir}; powering the guests off straight from its records`);
    expect(stderr).toContain('no VM has a running QEMU; nothing to power off');
    // Without --state-dir the same is an error: nothing may be done behind a daemon's back.
    expect((await vmkeep(['stop', '--all', '--timeout', '5'], down)).code).toBe(1);
    expect((await vmkeep(['stop', 'web', '--state-dir', stateDir])).code).toBe(2);
  });

  it('asks every VM with a QEMU at once, prints a line per VM and exits 0 when all powered off', async () => {
    ops.addVm('web', 'running');
    ops.addVm('db', 'running');
    ops.addVm('idle', 'stopped');
    // Both requests must be in flight before either answers: the guests power off together.
    let release!: () => void;
    ops.holdStops = new Promise<void>((resolve) => (release = resolve));
    let bothAsked!: () => void;
    const asked = new Promise<void>((resolve) => (bothAsked = resolve));
    const stop = ops.stop.bind(ops);
    ops.stop = (name: string, options?: StopOptions): Promise<VmView> => {
      const answer = stop(name, options);
      if (stopCalls().length === 2) bothAsked();
      return answer;
    };
    const running = vmkeep(['stop', '--all']);
    await within(asked, 3000, 'both stop requests to reach the daemon before either answered');
    release();
    const { code, stdout, stderr } = await running;

    expect(code).toBe(0);
    expect(stdout.split('\n').sort()).toEqual(['', 'db: stopped', 'web: stopped']);
    expect(stderr).toBe('vmkeep: asking 2 VMs to power off (ACPI), waiting up to 60 s: web, db\n');
    // The timeout is always passed, so the daemon's wait and the messages agree; idle is not asked.
    expect(stopCalls().map((c) => c.args).sort()).toEqual([['db', { timeoutSec: 60 }], ['web', { timeoutSec: 60 }]]);
    expect([...ops.vms.values()].map((vm) => vm.state)).toEqual(['stopped', 'stopped', 'stopped']);
  });

  it('a guest that ignores ACPI is left running, named on stderr, exit 3', async () => {
    ops.addVm('web', 'running');
    ops.addVm('deaf', 'running');
    ops.stopFailures.set('deaf', deafTimeout(5));
    const { code, stdout, stderr } = await vmkeep(['stop', '--all', '--timeout', '5']);

    expect(code).toBe(3);
    expect(stdout.split('\n').sort()).toEqual(['', 'deaf: did not power off within 5 s; left running', 'web: stopped']);
    expect(stderr.split('\n').at(-2)).toBe('vmkeep: still running after 5 s: deaf');
    expect(ops.vms.get('deaf')?.state).toBe('running');
    expect(ops.vms.get('web')?.state).toBe('stopped');
  });

  it('--json: one JSON line per VM, then the result document', async () => {
    ops.addVm('web', 'running');
    ops.addVm('deaf', 'running');
    ops.stopFailures.set('deaf', deafTimeout(7));
    const { code, stdout, stderr } = await vmkeep(['stop', '--all', '--timeout', '7', '--json']);

    expect(code).toBe(3);
    const lines = stdout.trim().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(lines).toHaveLength(3);
    const perVm = lines.slice(0, 2).sort((a, b) => String(a.vm).localeCompare(String(b.vm)));
    expect(perVm).toEqual([
      { type: 'vm', vm: 'deaf', result: 'timeout', code: 'STOP_TIMEOUT', message: expect.stringContaining('did not power off within 7 s') },
      { type: 'vm', vm: 'web', result: 'stopped', state: 'stopped' },
    ]);
    expect(lines[2]).toEqual({ type: 'result', timeoutSec: 7, stopped: ['web'], timedOut: ['deaf'], failed: [], stillRunning: ['deaf'] });
    // The journal still gets the names (stderr is not the JSON channel).
    expect(stderr).toBe('vmkeep: still running after 7 s: deaf\n');
  });

  it('a VM that cannot be asked (unreachable monitor) is reported, counted as running, exit 1', async () => {
    ops.addVm('web', 'running');
    ops.addVm('deaf', 'running');
    ops.addVm('lost', 'running');
    ops.stopFailures.set('deaf', deafTimeout(60));
    ops.stopFailures.set('lost', new DaemonError('UNREACHABLE', "lost's monitor does not answer"));
    const { code, stdout, stderr } = await vmkeep(['stop', '--all']);

    expect(code).toBe(1);
    expect(stdout).toContain('lost: could not be asked to power off [UNREACHABLE]: lost\'s monitor does not answer\n');
    expect(stdout).toContain('deaf: did not power off within 60 s; left running\n');
    expect(stderr).toMatch(/vmkeep: still running after 60 s: (deaf, lost|lost, deaf)\n$/);
  });

  it('no VM with a QEMU: nothing to do, exit 0', async () => {
    ops.addVm('idle', 'stopped');
    expect(await vmkeep(['stop', '--all'])).toEqual({ code: 0, stdout: '', stderr: 'vmkeep: no VM has a running QEMU; nothing to power off\n' });
    const json = await vmkeep(['stop', '--all', '--json']);
    expect(json.code).toBe(0);
    expect(JSON.parse(json.stdout)).toEqual({ type: 'result', timeoutSec: 60, stopped: [], timedOut: [], failed: [], stillRunning: [] });
    expect(stopCalls()).toEqual([]);
  });

  it('runs in the environment of vmkeep-guests.service (VMKEEP_SHUTDOWN_TIMEOUT set)', async () => {
    ops.addVm('web', 'running');
    // The parser reads VMKEEP_* variables from process.env itself.
    process.env.VMKEEP_SHUTDOWN_TIMEOUT = '9';
    try {
      expect(await vmkeep(['stop', '--all', '--timeout', '9'])).toMatchObject({ code: 0, stdout: 'web: stopped\n' });
    } finally {
      delete process.env.VMKEEP_SHUTDOWN_TIMEOUT;
    }
    expect(stopCalls().map((c) => c.args)).toEqual([['web', { timeoutSec: 9 }]]);
  });

  it('no daemon: DAEMON_DOWN, exit 1', async () => {
    const { code, stderr } = await vmkeep(['stop', '--all'], join(dir, 'nothing-here.sock'));
    expect(code).toBe(1);
    expect(stderr).toContain('vmkeep: error [DAEMON_DOWN]');
  });

  it.each([
    [['stop'], 'name one VM or give --all'],
    [['stop', 'web', '--all'], 'name one VM or give --all'],
    [['stop', '--all', '--force'], '--all never forces a guest off'],
    [['stop', '--all', '--timeout', '0'], '--timeout must be a positive number'],
    [['stop', 'Web/1'], 'is not a valid VM name'],
  ])('usage error %j exits 2 and asks nothing of the daemon', async (args, message) => {
    ops.addVm('web', 'running');
    const { code, stderr } = await vmkeep(args);
    expect(code).toBe(2);
    expect(stderr).toContain(message);
    expect(ops.calls).toEqual([]);
  });
});

describe('stop NAME is unchanged', () => {
  it('asks one VM, says so on stderr, prints its state; a timeout is an error, exit 1', async () => {
    ops.addVm('web', 'running');
    expect(await vmkeep(['stop', 'web'])).toEqual({
      code: 0,
      stdout: 'web: stopped\n',
      stderr: 'vmkeep: asking web to power off (ACPI), pressing the button again every 2 s until the guest acts (a booting guest misses the first press), for up to 60 s\n',
    });
    expect(stopCalls().map((c) => c.args)).toEqual([['web', {}]]);

    ops.addVm('deaf', 'running');
    ops.stopFailures.set('deaf', deafTimeout(60));
    const deaf = await vmkeep(['stop', 'deaf']);
    expect(deaf.code).toBe(1);
    expect(deaf.stderr).toContain('vmkeep: error [STOP_TIMEOUT]: deaf did not power off within 60 s');
  });
});
