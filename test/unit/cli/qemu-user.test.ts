// --qemu-user: resolved from the passwd file (Node has no getpwnam), root refused without
// --allow-qemu-root; and the command that starts QEMU as that user (setpriv, the user's groups).
import { chmodSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { resolveQemuUser } from '../../../cli/daemon-command.js';
import { vmkeepdOptions } from '../../../cli/options.js';
import { parseOptions } from '../../../cli/small-args.js';
import { commandAs, deniedTo } from '../../../launcher/index.js';

const dir = mkdtempSync(join(tmpdir(), 'vk-passwd-'));
const passwd = join(dir, 'passwd');
writeFileSync(passwd, 'root:x:0:0:root:/root:/bin/bash\nvmkeep-qemu:x:999:995::/nonexistent:/usr/sbin/nologin\n');
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('--qemu-user', () => {
  it('defaults to vmkeep-qemu, or VMKEEP_QEMU_USER; root is allowed only with the flag', () => {
    expect(parseOptions(vmkeepdOptions({}), [], {}, 'VMKEEP').values).toMatchObject({ qemuUser: 'vmkeep-qemu', allowQemuRoot: false });
    const env = { VMKEEP_QEMU_USER: 'root', VMKEEP_ALLOW_QEMU_ROOT: 'true' };
    expect(parseOptions(vmkeepdOptions(env), [], env, 'VMKEEP').values)
      .toMatchObject({ qemuUser: 'root', allowQemuRoot: true });
  });

  it('resolves a name or a uid to uid and primary gid', () => {
    expect(resolveQemuUser('vmkeep-qemu', false, passwd)).toEqual({ name: 'vmkeep-qemu', uid: 999, gid: 995 });
    expect(resolveQemuUser('999', false, passwd)).toEqual({ name: 'vmkeep-qemu', uid: 999, gid: 995 });
  });

  it('refuses a missing user with the useradd that makes it, and root without --allow-qemu-root', () => {
    expect(() => resolveQemuUser('nobody-here', false, passwd)).toThrow(/no such user .*useradd --system/);
    expect(() => resolveQemuUser('root', false, passwd)).toThrow(/--allow-qemu-root/);
    expect(resolveQemuUser('root', true, passwd)).toEqual({ name: 'root', uid: 0, gid: 0 });
  });
});

describe('deniedTo (what QEMU\'s user may reach, by the mode bits)', () => {
  const user = { name: 'vmkeep-qemu', uid: 999, gid: 995 };
  it('names the folder it cannot pass, then the file it cannot read', async () => {
    const folder = join(dir, 'hidden');
    const file = join(folder, 'vmlinuz');
    chmodSync(dir, 0o711);
    mkdirSync(folder, { mode: 0o700 });
    chmodSync(folder, 0o700);
    writeFileSync(file, 'k', { mode: 0o600 });
    expect(await deniedTo(file, user, 'read')).toBe(`it cannot pass through ${folder}`);
    expect(await deniedTo(folder, user, 'pass')).toBe(`it cannot pass through ${folder}`);
    chmodSync(folder, 0o711);
    expect(await deniedTo(file, user, 'read')).toBe('it may not read the file');
    expect(await deniedTo(folder, user, 'pass')).toBeUndefined();
    chmodSync(file, 0o644);
    expect(await deniedTo(file, user, 'read')).toBeUndefined();
  });
});

describe('commandAs', () => {
  const command = { binary: '/usr/bin/qemu-system-x86_64', argv: ['-S'] };
  it('wraps QEMU in setpriv with the user\'s ids and groups; root or no user runs it as is', () => {
    expect(commandAs(command, { name: 'vmkeep-qemu', uid: 999, gid: 995 })).toEqual({
      file: 'setpriv', args: ['--reuid', '999', '--regid', '995', '--init-groups', '--', '/usr/bin/qemu-system-x86_64', '-S'],
    });
    expect(commandAs(command, { name: 'root', uid: 0, gid: 0 })).toEqual({ file: command.binary, args: ['-S'] });
    expect(commandAs(command, undefined)).toEqual({ file: command.binary, args: ['-S'] });
  });
});
