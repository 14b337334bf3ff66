// --operator-bridge: repeatable, each a network interface name; none by default (operators'
// VMs then have user-mode NICs only, daemon/access.ts).
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
