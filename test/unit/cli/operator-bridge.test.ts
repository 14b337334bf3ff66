// --operator-bridge: repeatable, each a network interface name; none by default (operators'
// VMs then have user-mode NICs only, daemon/access.ts). --operator-user-net: what those reach.
import { describe, expect, it } from 'vitest';
import { daemonCommandArgs } from '../../../cli/daemon-command.js';
import { vmkeepdOptions } from '../../../cli/options.js';
import { parseOptions } from '../../../cli/small-args.js';

const parse = (argv: string[]) => daemonCommandArgs(parseOptions(vmkeepdOptions({}), argv, {}, 'VMKEEP').values as never, {}).args;

describe('--operator-bridge', () => {
  it('is repeatable; absent, operators get no bridge', () => {
    expect(parse([]).operatorBridges).toBeUndefined();
    expect(parse(['--operator-bridge', 'br-ops', '--operator-bridge', 'br1']).operatorBridges).toEqual(['br-ops', 'br1']);
  });

  it('refuses what is not an interface name, with an example', () => {
    expect(() => parse(['--operator-bridge', 'br0/x'])).toThrow(/--operator-bridge "br0\/x" is not a network interface name; name a Linux bridge, e\.g\. br0/);
    expect(() => parse(['--operator-bridge', 'a-name-longer-than-15'])).toThrow(/not a network interface name/);
  });
});

describe('--operator-user-net', () => {
  it('is restricted by default, open when asked, nothing else; its help says what each reaches', () => {
    expect(parse([]).operatorUserNet).toBe('restricted');
    expect(parse(['--operator-user-net', 'open']).operatorUserNet).toBe('open');
    expect(() => parse(['--operator-user-net', 'on'])).toThrow(/operator-user-net.*Choices: "restricted", "open"/s);
    expect(vmkeepdOptions({})['operator-user-net']?.describe).toContain('10.0.2.2');
  });
});
