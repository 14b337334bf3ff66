// The npm package as a user gets it: `npm pack` of the tree (its prepack builds dist/), the
// tarball installed with `npm install -g` into a temporary prefix, and the installed `vmkeep`
// and `vmkeepd` commands run: --version, and `vmkeep list` against that vmkeepd.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execa } from 'execa';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { requireQemu } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';

const ROOT = projectRoot();
const VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

let work: string;
let prefix: string;
let daemon: ChildProcess | undefined;

beforeAll(async () => {
  requireQemu();
  work = await mkdtemp(join(tmpdir(), 'vk-npm-'));
  // QEMU's user must pass through it to the state and runtime folders (vmkeepd checks at start).
  await chmod(work, 0o711);
  prefix = join(work, 'prefix');
});

afterAll(async () => {
  if (daemon && daemon.exitCode === null && daemon.signalCode === null) {
    daemon.kill('SIGKILL');
    await once(daemon, 'exit');
  }
  if (work) await rm(work, { recursive: true, force: true });
});

/** Output of an installed command; a failure names the command and its output. */
async function runBoth(command: string, args: string[]): Promise<{ stdout: string; stderr: string }> {
  const result = await execa(join(prefix, 'bin', command), args, { reject: false, all: true, stdin: 'ignore' });
  if (result.exitCode !== 0) throw new Error(`${command} ${args.join(' ')} exited ${String(result.exitCode)}:\n${result.all}`);
  return result;
}

async function run(command: string, args: string[]): Promise<string> {
  return (await runBoth(command, args)).stdout;
}

describe('the npm package', () => {
  let tarball: string;

  it('npm pack holds the built JavaScript (prepack) and no tests', async () => {
    const packed = await execa('npm', ['pack', '--json', '--pack-destination', work], { cwd: ROOT, reject: false, all: true });
    expect(packed.exitCode, `npm pack failed:\n${packed.all}`).toBe(0);
    // prepack's build output comes before the JSON document on stdout.
    const json = packed.stdout.slice(packed.stdout.indexOf('[\n'));
    const [info] = JSON.parse(json) as Array<{ filename: string; files: Array<{ path: string }> }>;
    tarball = join(work, info!.filename);
    const files = info!.files.map((f) => f.path);
    expect(files).toEqual(expect.arrayContaining(['dist/cli/main.js', 'dist/cli/vmkeepd.js', 'dist/daemon/index.js', 'package.json', 'README.md']));
    expect(files.filter((f) => f.startsWith('dist/test/') || f.endsWith('.ts') || f.endsWith('.map'))).toEqual([]);
  }, 180_000);

  it('npm install -g into a prefix gives working vmkeep and vmkeepd commands', async () => {
    await mkdir(prefix, { recursive: true });
    // The dependencies come from npm's cache when they are there (npm ci filled it).
    const installed = await execa('npm', ['install', '-g', '--prefix', prefix, '--prefer-offline', '--no-audit', '--no-fund', tarball], {
      reject: false, all: true, stdin: 'ignore',
    });
    expect(installed.exitCode, `npm install -g failed:\n${installed.all}`).toBe(0);
    expect(await run('vmkeep', ['--version'])).toBe(`vmkeep ${VERSION} (Node.js ${process.versions.node})`);
    const report = JSON.parse(await run('vmkeepd', ['--version', '--json'])) as { version: string; installations: Array<{ version?: string }> };
    expect(report.version).toBe(VERSION);
    expect(report.installations[0]?.version).toMatch(/^\d+\.\d+/);
  }, 180_000);

  it('the installed vmkeepd serves and the installed vmkeep lists its VMs', async () => {
    expect(existsSync(join(prefix, 'bin', 'vmkeepd')), 'the previous test installed the package').toBe(true);
    const socket = join(work, 'run', 'vmkeep.sock');
    // --no-scope: this daemon runs without systemd; it is only asked for its (empty) list.
    daemon = spawn(join(prefix, 'bin', 'vmkeepd'), [
      '--no-scope', '--state-dir', join(work, 'state'), '--runtime-dir', join(work, 'run'), '--socket', socket,
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`vmkeepd did not log "vmkeepd ready" within 30 s:\n${log}`)), 30_000);
      daemon!.stderr!.setEncoding('utf8').on('data', (chunk: string) => {
        log += chunk;
        if (log.includes('vmkeepd ready')) {
          clearTimeout(timer);
          resolve();
        }
      });
      daemon!.once('exit', (code) => {
        clearTimeout(timer);
        reject(new Error(`vmkeepd exited (${String(code)}) before it was ready:\n${log}`));
      });
    });
    expect(JSON.parse(await run('vmkeep', ['list', '--json', '--socket', socket]))).toEqual([]);
    // No VMs yet: nothing on stdout, the next step on stderr.
    expect(await runBoth('vmkeep', ['list', '--socket', socket])).toMatchObject({ stdout: '', stderr: expect.stringContaining('vmkeep create') });
    daemon.kill('SIGTERM');
    const [code] = (await once(daemon, 'exit')) as [number | null];
    expect(code, `vmkeepd's exit after SIGTERM:\n${log}`).toBe(0);
  }, 60_000);
});
