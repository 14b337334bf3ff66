// The notify helper: one shell started with the daemon runs systemd-notify per message, with
// the daemon's PID and each assignment as one argument. A fake systemd-notify on PATH records
// what it was given.
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { notifyField, startNotifier, type Notifier } from '../../../daemon/notify.js';
import { within } from '../qmp/fake-peer.js';

let dir: string;
let notifier: Notifier | undefined;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'vmkeep-notify-'));
  // One line per call: the arguments separated by "|".
  await writeFile(join(dir, 'systemd-notify'), `#!/bin/sh\n(IFS='|'; echo "$*") >> "${dir}/calls"\n[ "$2" != "FAIL=1" ]\n`);
  await chmod(join(dir, 'systemd-notify'), 0o755);
});
afterEach(async () => {
  notifier?.close();
  await rm(dir, { recursive: true, force: true });
});

async function calls(count: number): Promise<string[]> {
  return within((async () => {
    for (;;) {
      const text = await readFile(join(dir, 'calls'), 'utf8').catch(() => '');
      const lines = text.split('\n').filter(Boolean);
      if (lines.length >= count) return lines;
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
  })(), 5000, `${count} systemd-notify call(s) in ${dir}/calls`);
}

describe('startNotifier', () => {
  it('sends each message with the daemon\'s PID, assignments kept whole', async () => {
    notifier = startNotifier({ ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}`, NOTIFY_SOCKET: '/run/fake' });
    notifier.send('READY=1', 'STATUS=3 VM(s): 2 running, 1 paused');
    notifier.send(`STATUS=${notifyField('a\tb\nc')}`);
    expect(await calls(2)).toEqual([`--pid=${process.pid}|READY=1|STATUS=3 VM(s): 2 running, 1 paused`, `--pid=${process.pid}|STATUS=a b c`]);
  });

  it('goes on after a failed call', async () => {
    notifier = startNotifier({ ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}`, NOTIFY_SOCKET: '/run/fake' });
    notifier.send('FAIL=1');
    notifier.send('READY=1');
    expect((await calls(2))[1]).toBe(`--pid=${process.pid}|READY=1`);
  });

  it('starts no helper without NOTIFY_SOCKET (not under a notify unit)', async () => {
    notifier = startNotifier({ PATH: `${dir}:${process.env.PATH ?? ''}` });
    notifier.send('READY=1');
    // Then a helper that is started sends the next message: the order shows none ran before.
    const other = startNotifier({ ...process.env, PATH: `${dir}:${process.env.PATH ?? ''}`, NOTIFY_SOCKET: '/run/fake' });
    other.send('STATUS=second');
    try {
      expect(await calls(1)).toEqual([`--pid=${process.pid}|STATUS=second`]);
    } finally {
      other.close();
    }
  });
});
