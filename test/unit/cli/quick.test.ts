// The quick path (`vmkeep list` without yargs) answers exactly as the full parser does, and
// leaves every command line it does not fully understand to it.
import { describe, expect, it } from 'vitest';
import { main } from '../../../cli/index.js';
import { versionLine } from '../../../cli/command-line.js';
import { runQuick } from '../../../cli/quick.js';
import { Capture, useCliHarness } from './harness.js';

const cli = useCliHarness('vmkeep-quick-');

async function both(argv: string[], env: NodeJS.ProcessEnv = {}) {
  const run = async (entry: typeof main) => {
    const stdout = new Capture();
    const stderr = new Capture();
    const code = await entry(argv, { stdout, stderr, env, onSignal: () => () => undefined });
    return { code, stdout: stdout.text, stderr: stderr.text };
  };
  const quick = await run(async (a, io) => {
    const code = await runQuick(a, io);
    if (code === undefined) throw new Error(`the quick path left ${a.join(' ')} to the full parser`);
    return code;
  });
  return { quick, full: await run(main) };
}

describe('vmkeep list without yargs', () => {
  it('prints what the full parser prints: table, JSON, no VMs, daemon down', async () => {
    cli.ops.addVm('web1', 'running');
    for (const argv of [['list', '--socket', cli.socketPath], ['ls', '--json', `--socket=${cli.socketPath}`], ['list', '--json=true', '--socket', cli.socketPath]]) {
      const { quick, full } = await both(argv);
      expect(quick, argv.join(' ')).toEqual(full);
      expect(quick.code).toBe(0);
      expect(quick.stdout).toContain('web1');
    }
    // A variable of another command's option (VMKEEP_QEMU) is ignored by both.
    const viaEnv = await both(['list', '--json'], { VMKEEP_SOCKET: cli.socketPath, VMKEEP_QEMU: '/x' });
    expect(viaEnv.quick).toEqual(viaEnv.full);
    expect(JSON.parse(viaEnv.quick.stdout)).toHaveLength(1);
    const down = await both(['list', '--socket', `${cli.dir}/nobody.sock`]);
    expect(down.quick).toEqual(down.full);
    expect(down.quick.code).toBe(1);
  });

  it('leaves help, typos, extra words and other commands to the full parser', async () => {
    const io = { stdout: new Capture(), stderr: new Capture(), env: {}, onSignal: () => () => undefined };
    for (const argv of [['list', '--help'], ['list', '--sockt', 'x'], ['list', 'extra'], ['--json', 'list'], ['status', 'web1'], [], ['list', '--json=maybe']]) {
      expect(await runQuick(argv, io), argv.join(' ')).toBeUndefined();
    }
    expect(io.stdout.text + io.stderr.text).toBe('');
  });
});

describe('vmkeep --version without yargs', () => {
  it('prints the version line and nothing else', async () => {
    for (const argv of [['--version'], ['-V']]) {
      const { code, stdout, stderr } = await cli.vmkeep(argv, { socket: false });
      expect(code).toBe(0);
      expect(stderr).toBe('');
      expect(stdout).toBe(`${versionLine()}\n`);
      expect(stdout).toMatch(/^vmkeep \d+\.\d+\.\d+ \(Node\.js \d+\.\d+\.\d+\)\n$/);
    }
  });
});
