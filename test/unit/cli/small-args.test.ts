// vmkeepd's own option parser against the daemon's option table: what yargs accepts for
// `vmkeep daemon` is accepted the same way, and what its strict mode refuses is refused.
import { describe, expect, it } from 'vitest';
import { CliError } from '../../../cli/index.js';
import { vmkeepdOptions } from '../../../cli/options.js';
import { formatOptionsHelp, parseOptions } from '../../../cli/small-args.js';

const parse = (argv: string[], env: NodeJS.ProcessEnv = {}) => parseOptions(vmkeepdOptions(env), argv, env, 'VMKEEP');

describe('vmkeepd options', () => {
  it('gives the defaults without arguments', () => {
    const { values, help } = parse([]);
    expect(help).toBe(false);
    expect(values).toMatchObject({
      qemu: 'qemu-system-x86_64', stateDir: '/var/lib/vmkeep', runtimeDir: '/run/vmkeep', socket: '/run/vmkeep/vmkeep.sock',
      slice: 'vmkeep.slice', scope: true, refreshAtStart: false, refreshPolicy: 'manual', logLevel: 'info',
    });
    expect(values).not.toHaveProperty('installations');
  });

  it('takes --name value, --name=value, camelCase, --no-flag and repeated arrays', () => {
    const { values } = parse([
      '--state-dir', '/s', '--runtimeDir=/r', '--no-scope', '--firmware-dir', '/a', '--firmware-dir=/b',
      '--refresh-at-start', '--refresh-policy', 'reboot', '--guests-unit', 'g.service', '--test-crash-at', 'step',
    ]);
    expect(values).toMatchObject({
      stateDir: '/s', runtimeDir: '/r', scope: false, firmwareDir: ['/a', '/b'], refreshAtStart: true,
      refreshPolicy: 'reboot', guestsUnit: 'g.service', testCrashAt: 'step',
    });
  });

  it('takes a boolean value as --flag=false or as the next word', () => {
    expect(parse([]).values.tapRepair).toBe(true);
    expect(parse(['--no-tap-repair']).values.tapRepair).toBe(false);
    expect(parse([], { VMKEEP_TAP_REPAIR: 'false' }).values.tapRepair).toBe(false);
    expect(parse(['--scope=false']).values.scope).toBe(false);
    expect(parse(['--scope', 'false', '--refresh-at-start', 'true']).values).toMatchObject({ scope: false, refreshAtStart: true });
  });

  it('reads VMKEEP_* variables below the command line, and ignores those of no option', () => {
    const env = { VMKEEP_TEST_CRASH_AT: 'x', VMKEEP_SCOPE: 'false', VMKEEP_INSTALLATIONS: '/i.json', VMKEEP_SHUTDOWN_TIMEOUT: '5', VMKEEP_STATE_DIR: '/env' };
    expect(parse([], env).values).toMatchObject({ testCrashAt: 'x', scope: false, installations: '/i.json', stateDir: '/env' });
    expect(parse(['--test-crash-at', 'y', '--scope'], env).values).toMatchObject({ testCrashAt: 'y', scope: true });
  });

  it('puts the state under $SNAP_COMMON in a snap', () => {
    expect(parse([], { SNAP_COMMON: '/var/snap/vmkeep/common' }).values.stateDir).toBe('/var/snap/vmkeep/common/state');
  });

  it('refuses unknown options, positionals, missing values and values outside the choices', () => {
    for (const argv of [['--bogus'], ['run'], ['--state-dir'], ['--state-dir', '--socket', 's'], ['--log-level', 'loud'], ['--scope=maybe'], ['--no-state-dir']]) {
      expect(() => parse(argv), argv.join(' ')).toThrow(CliError);
    }
    expect(() => parse(['--bogus'])).toThrow('Unknown argument: bogus');
    expect(() => parse(['--refresh-policy', 'later'])).toThrow(/Choices: .*"migrate"/);
  });

  it('says when help was asked for, and the help names every visible option', () => {
    expect(parse(['--help']).help).toBe(true);
    expect(parse(['-h']).help).toBe(true);
    const text = formatOptionsHelp('usage', vmkeepdOptions({}));
    for (const name of ['--state-dir', '--[no-]scope', '--installations', '--refresh-policy', '--log-level']) expect(text).toContain(name);
    expect(text).not.toContain('test-crash-at');
  });
});
