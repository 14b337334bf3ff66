// The snap's bash completer (snap/local/vmkeep-completion.bash), sourced by bash as snapd does,
// outside a snap: $SNAP/lib/vmkeep is this project, $SNAP/bin/node the real node except for
// `list --json`, which answers a fixed VM list (no daemon in unit tests).
import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO, SNAP_DIR } from './sandbox.js';

let snap: string;

beforeAll(async () => {
  snap = await mkdtemp(join(tmpdir(), 'vk-completer-'));
  await mkdir(join(snap, 'bin'));
  await mkdir(join(snap, 'lib'));
  await symlink(REPO, join(snap, 'lib', 'vmkeep'));
  await writeFile(join(snap, 'bin', 'node'), `#!/bin/bash
if [[ $2 == list && $3 == --json ]]; then echo '[{"name":"web1","state":"running"},{"name":"db"}]'; exit 0; fi
exec '${process.execPath}' "$@"
`);
  await chmod(join(snap, 'bin', 'node'), 0o755);
});

afterAll(async () => {
  await rm(snap, { recursive: true, force: true });
});

/** COMPREPLY for the words typed so far (the last one being completed). */
async function complete(...words: string[]): Promise<string[]> {
  const script = `source '${join(SNAP_DIR, 'local', 'vmkeep-completion.bash')}'
COMP_WORDS=(${words.map((w) => `'${w}'`).join(' ')}); COMP_CWORD=${words.length - 1}
_vmkeep; printf '%s\\n' "\${COMPREPLY[@]}"`;
  const r = await execa('bash', ['-c', script], { env: { SNAP: snap } });
  return r.stdout.split('\n').filter((l) => l !== '').sort();
}

describe('the snap completer', () => {
  it('completes commands from the CLI', async () => {
    expect(await complete('vmkeep', 'sta')).toEqual(['start', 'status']);
    expect(await complete('vmkeep', 'upgr')).toEqual(['upgrade-status']);
  });

  it('completes VM names after a command that takes one', async () => {
    expect(await complete('vmkeep', 'stop', '')).toEqual(['db', 'web1']);
    expect(await complete('vmkeep', 'refresh', 'w')).toEqual(['web1']);
  });

  it('completes options, not names, after a dash', async () => {
    expect(await complete('vmkeep', 'stop', '--ti')).toEqual(['--timeout']);
  });

  it('is registered for the vmkeep command', async () => {
    const r = await execa('bash', ['-c', `source '${join(SNAP_DIR, 'local', 'vmkeep-completion.bash')}'; complete -p vmkeep`]);
    expect(r.stdout).toBe('complete -F _vmkeep vmkeep');
  });
});
