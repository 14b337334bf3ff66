// vmkeepd's own lines carry their journald priority when its stderr is the journal's stream
// (JOURNAL_STREAM = that stream's DEV:INODE, as systemd sets it) and journald's native socket is
// not there (journal-fields.test.ts tests that socket): a real vmkeepd process, its stderr a file
// standing in for the journal's stream, in a mount namespace where /run/systemd/journal is empty
// even on a host running journald. Negative control: without JOURNAL_STREAM the lines are plain
// JSON.
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync } from 'node:fs';
import { chmod, mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { projectRoot } from '../support/paths.js';
import { waitFor } from '../support/systemd-host.js';

const VMKEEPD = join(projectRoot(), 'dist', 'cli', 'vmkeepd.js');
const dirs: string[] = [];
const HIDE_JOURNAL_SOCKET = '[ ! -d /run/systemd/journal ] || mount -t tmpfs none /run/systemd/journal || exit 1; exec "$@"';

afterEach(async () => {
  for (const dir of dirs.splice(0)) await rm(dir, { recursive: true, force: true });
});

/** Runs vmkeepd --no-scope (it logs a warning) until ready, stops it, returns its stderr lines. */
async function daemonLines(journal: boolean): Promise<string[]> {
  const dir = await mkdtemp(join(tmpdir(), 'vk-journal-'));
  // QEMU's user must pass through it to the state and runtime folders (vmkeepd checks at start).
  await chmod(dir, 0o711);
  dirs.push(dir);
  const logFile = join(dir, 'stderr');
  const fd = openSync(logFile, 'w');
  const { dev, ino } = fstatSync(fd);
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env.JOURNAL_STREAM;
  if (journal) env.JOURNAL_STREAM = `${dev}:${ino}`;
  const child = spawn('unshare', ['--mount', '--propagation', 'private', 'sh', '-c', HIDE_JOURNAL_SOCKET, 'sh', process.execPath, VMKEEPD, '--no-scope', '--state-dir', join(dir, 'state'), '--runtime-dir', join(dir, 'run'), '--socket', join(dir, 'run', 'vmkeep.sock')],
    { stdio: ['ignore', 'ignore', fd], env });
  closeSync(fd);
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    await waitFor('vmkeepd ready in its log', 30_000, async () => ((await readFile(logFile, 'utf8')).includes('vmkeepd ready') ? true : undefined));
  } finally {
    child.kill('SIGTERM');
  }
  await exited;
  return (await readFile(logFile, 'utf8')).split('\n').filter((line) => line !== '');
}

describe("vmkeepd's log priorities", () => {
  it('under the journal: <4> on the warning, <6> on info lines, and the JSON after it intact', async () => {
    const lines = await daemonLines(true);
    const warning = lines.find((line) => line.includes('--no-scope'));
    expect(warning).toMatch(/^<4>\{"level":40,/);
    expect(lines.find((line) => line.includes('vmkeepd ready'))).toMatch(/^<6>\{"level":30,/);
    for (const line of lines) expect(() => JSON.parse(line.replace(/^<\d>/, '')), line).not.toThrow();
    expect(lines.every((line) => /^<[0-7]>\{/.test(line))).toBe(true);
  });

  it('negative control: not under the journal, the lines are plain JSON', async () => {
    const lines = await daemonLines(false);
    expect(lines.length).toBeGreaterThan(1);
    for (const line of lines) expect(line.startsWith('{"level":'), line).toBe(true);
  });
});
