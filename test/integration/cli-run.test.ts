// `vmkeep run` as a user runs it: the compiled CLI, a spec file, the real tiny guest, signals.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { isSameProcess, readProcessIdentity } from '../../launcher/index.js';
import { ensureGuestImage, requireQemu, type GuestImage } from '../support/guest.js';

const CLI = fileURLToPath(new URL('../../dist/cli/main.js', import.meta.url));

let guest: GuestImage;
let work: string;
const children: ChildProcess[] = [];
const qemuPids: Array<{ pid: number; startTime: string }> = [];

beforeAll(async () => {
  requireQemu();
  guest = await ensureGuestImage();
});

afterEach(async () => {
  for (const child of children.splice(0)) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
  // vmkeep run detaches QEMU into its own session: end any the test left behind, by PID.
  for (const { pid, startTime } of qemuPids.splice(0)) {
    if (isSameProcess(pid, startTime)) process.kill(pid, 'SIGKILL');
  }
  if (work) await rm(work, { recursive: true, force: true });
});

interface JsonLine {
  type: string;
  [key: string]: unknown;
}

/** Runs the CLI with --json, collecting its output lines; `until` resolves at a matching line. */
function startCli(args: string[]) {
  const child = spawn(process.execPath, [CLI, ...args, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  const lines: JsonLine[] = [];
  let stderr = '';
  const waiters: Array<{ test: (l: JsonLine) => boolean; resolve: (l: JsonLine) => void }> = [];
  let buffered = '';
  child.stdout!.setEncoding('utf8').on('data', (chunk: string) => {
    buffered += chunk;
    const parts = buffered.split('\n');
    buffered = parts.pop() ?? '';
    for (const part of parts) {
      const line = JSON.parse(part) as JsonLine;
      lines.push(line);
      if (line.type === 'notice' && typeof line.pid === 'number') {
        const proc = readStart(line.pid);
        if (proc) qemuPids.push(proc);
      }
      for (const w of waiters.splice(0)) (w.test(line) ? w.resolve(line) : waiters.push(w));
    }
  });
  child.stderr!.setEncoding('utf8').on('data', (chunk: string) => (stderr += chunk));
  const exit = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return {
    child,
    lines,
    exit,
    stderr: () => stderr,
    until(test: (l: JsonLine) => boolean, what: string, timeoutMs: number): Promise<JsonLine> {
      const seen = lines.find(test);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; output:\n${lines.map((l) => JSON.stringify(l)).join('\n')}\n${stderr}`)),
          timeoutMs,
        );
        waiters.push({ test, resolve: (l) => (clearTimeout(timer), resolve(l)) });
      });
    },
  };
}

function readStart(pid: number): { pid: number; startTime: string } | undefined {
  const identity = readProcessIdentity(pid);
  return identity ? { pid, startTime: identity.startTime } : undefined;
}

async function writeSpec(fields: Record<string, unknown>): Promise<string> {
  work = await mkdtemp(join(tmpdir(), 'vmkeep-cli-'));
  const path = join(work, 'vm.json');
  await writeFile(path, JSON.stringify(fields));
  return path;
}

describe('vmkeep run', () => {
  it('boots the guest with its console on stdout; Ctrl-C powers it off cleanly and exits 0', async () => {
    const spec = await writeSpec({ name: 'demo', kernel: guest.kernel, initrd: guest.initrd, append: guest.append });
    const run = startCli(['run', spec, '--state-dir', join(work, 'state')]);
    const started = await run.until((l) => l.type === 'notice' && typeof l.pid === 'number', 'the VM-started notice', 60_000);
    await run.until((l) => l.type === 'console' && l.line === 'GUEST READY', 'GUEST READY on the console', 60_000);

    run.child.kill('SIGINT');
    const code = await run.exit;
    expect(code, run.stderr()).toBe(0);
    expect(run.lines.some((l) => l.type === 'console' && l.line === 'GUEST POWEROFF')).toBe(true);
    expect(run.lines.at(-1)).toMatchObject({ type: 'result', outcome: 'powered-off', reason: 'guest-shutdown' });
    expect(isSameProcess(started.pid as number, qemuPids[0]!.startTime)).toBe(false);
    expect(existsSync(join(work, 'state', 'serial.log'))).toBe(true);
  });

  it('removes its temporary state folder at the end', async () => {
    const spec = await writeSpec({ name: 'tmpstate', kernel: guest.kernel, initrd: guest.initrd, append: guest.append });
    const run = startCli(['run', spec]);
    const started = await run.until((l) => l.type === 'notice' && typeof l.stateDir === 'string', 'the VM-started notice', 60_000);
    await run.until((l) => l.type === 'console' && l.line === 'GUEST READY', 'GUEST READY on the console', 60_000);
    expect(existsSync(started.stateDir as string)).toBe(true);
    run.child.kill('SIGTERM');
    expect(await run.exit).toBe(0);
    expect(existsSync(started.stateDir as string)).toBe(false);
  });

  it('a guest that ignores ACPI: QEMU is quit after --timeout and the exit code says so (3)', async () => {
    const spec = await writeSpec({ name: 'deaf', kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep.ignore_acpi` });
    const run = startCli(['run', spec, '--timeout', '1']);
    await run.until((l) => l.type === 'console' && l.line === 'GUEST READY', 'GUEST READY on the console', 60_000);
    run.child.kill('SIGINT');
    expect(await run.exit).toBe(3);
    expect(run.lines.find((l) => l.type === 'error')).toMatchObject({ code: 'POWEROFF_TIMEOUT' });
    expect(qemuPids.every((p) => !isSameProcess(p.pid, p.startTime))).toBe(true);
  });

  it('a second Ctrl-C quits QEMU at once (exit 130)', async () => {
    const spec = await writeSpec({ name: 'twice', kernel: guest.kernel, initrd: guest.initrd, append: `${guest.append} vmkeep.ignore_acpi` });
    const run = startCli(['run', spec, '--timeout', '600']);
    await run.until((l) => l.type === 'console' && l.line === 'GUEST READY', 'GUEST READY on the console', 60_000);
    run.child.kill('SIGINT');
    await run.until((l) => l.type === 'notice' && String(l.message).includes('power off'), 'the power-off notice', 10_000);
    run.child.kill('SIGINT');
    expect(await run.exit).toBe(130);
    expect(run.lines.at(-1)).toMatchObject({ type: 'result', outcome: 'quit' });
    expect(qemuPids.every((p) => !isSameProcess(p.pid, p.startTime))).toBe(true);
  });

  it('an invalid spec names every bad field and its fix, exits 1 and starts nothing', async () => {
    const spec = await writeSpec({ name: '../evil', memoryMiB: 1, kernel: 'relative/vmlinuz' });
    const run = startCli(['run', spec]);
    expect(await run.exit).toBe(1);
    const error = run.lines.find((l) => l.type === 'error');
    expect(error?.code).toBe('INVALID_SPEC');
    expect(error?.message).toMatch(/name/);
    expect(error?.message).toMatch(/memoryMiB/);
    expect(error?.message).toMatch(/kernel/);
    expect(run.lines.some((l) => l.type === 'notice' && typeof l.pid === 'number')).toBe(false);
  });

  it('a spec that is not JSON is refused with the parse error', async () => {
    work = await mkdtemp(join(tmpdir(), 'vmkeep-cli-'));
    const path = join(work, 'vm.json');
    await writeFile(path, '{"name": "x",');
    const run = startCli(['run', path]);
    expect(await run.exit).toBe(1);
    expect(run.lines.find((l) => l.type === 'error')).toMatchObject({ code: 'SPEC_NOT_JSON' });
  });
});
