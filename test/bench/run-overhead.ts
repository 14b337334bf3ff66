// Benchmark 2: what `vmkeep run` adds to a bare QEMU start, measured to "QMP ready".
import { spawn, type ChildProcess } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { once } from 'node:events';
import { closeSync, openSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  buildQemuCommand, probeInstallation, readProcessIdentity, resolveMachineType, validateSpec, waitForProcessExit,
} from '../../launcher/index.js';
import { connectQmp, isQmpError, type QmpClient } from '../../qmp/index.js';
import type { GuestImage } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import { log, met, systemInstallation, waitUntil, type Cleanup, type Section } from './common.js';
import { formatMs, median } from './stats.js';

const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');
const PAIRS = 12;
const TARGET_ADDED_MS = 150;
const CONNECT_POLL_MS = 5;
const READY_TIMEOUT_MS = 30_000;

interface Ctx {
  guest: GuestImage;
  workDir: string;
  cleanup: Cleanup;
}

interface JsonLine {
  type?: string;
  message?: string;
  pid?: number;
}

/** Calls `onLine` for each JSON line the CLI prints on stdout. */
function readJsonLines(child: ChildProcess, onLine: (line: JsonLine) => void): void {
  let buffered = '';
  child.stdout?.setEncoding('utf8').on('data', (chunk: string) => {
    buffered += chunk;
    const parts = buffered.split('\n');
    buffered = parts.pop() ?? '';
    for (const part of parts) {
      try {
        onLine(JSON.parse(part) as JsonLine);
      } catch {
        // not a JSON line: ignored
      }
    }
  });
}

function timeout(ms: number, what: string): Promise<never> {
  return new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms).unref());
}

interface RunSample {
  /** Spawn of the CLI to the notice line with the QEMU pid. */
  totalMs: number;
  /** The CLI's own "ready in N ms": launchVm alone. */
  launchMs: number;
  /** The first SIGINT killed the CLI before its handler was in place, leaving QEMU running. */
  orphaned: boolean;
}

/** (a) `vmkeep run SPEC --json`: ready when the notice carrying the QEMU pid is printed. */
async function timeVmkeepRun(ctx: Ctx, specPath: string, cacheDir: string, label: string): Promise<RunSample> {
  const stateDir = join(ctx.workDir, `run-${label}`);
  const lines: JsonLine[] = [];
  let stderr = '';
  let readyAt: number | undefined;
  const t0 = performance.now();
  const child = spawn(process.execPath, [CLI, 'run', specPath, '--json', '--cache-dir', cacheDir, '--state-dir', stateDir], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  readJsonLines(child, (line) => {
    if (readyAt === undefined && line.type === 'notice' && typeof line.pid === 'number') readyAt = performance.now();
    lines.push(line);
  });
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  let exitSignal: NodeJS.Signals | null = null;
  let exited = false;
  const exit = new Promise<void>((resolve) => child.once('exit', (_code, signal) => { exited = true; exitSignal = signal; resolve(); }));
  const endCli = ctx.cleanup.add(`vmkeep run ${label}`, async () => {
    if (!exited) child.kill('SIGKILL');
    await exit;
  });
  const output = (): string => `${lines.map((l) => JSON.stringify(l)).join('\n')}\n${stderr}`;
  try {
    const started = await waitUntil(`vmkeep run ${label} to print its "running" notice`, READY_TIMEOUT_MS, () => {
      if (exited) throw new Error(`vmkeep run ${label} exited before QMP was ready:\n${output()}`);
      return lines.find((l) => l.type === 'notice' && typeof l.pid === 'number');
    }, 2);
    const totalMs = (readyAt ?? performance.now()) - t0;
    const launchMs = Number(/ready in (\d+) ms/.exec(String(started.message))?.[1] ?? NaN);
    const qemuPid = started.pid as number;
    // vmkeep run starts QEMU in its own session: if the CLI dies, QEMU lives on; track it by PID.
    const identity = readProcessIdentity(qemuPid);
    if (identity === null) throw new Error(`QEMU pid ${qemuPid} of vmkeep run ${label} is already gone`);
    const endQemu = ctx.cleanup.trackQemu(qemuPid, identity.startTime);
    // The first signal asks for an ACPI power-off (a booting guest ignores it), the second quits QEMU.
    child.kill('SIGINT');
    await waitUntil(`the power-off notice of vmkeep run ${label}`, 10_000, () =>
      exited || lines.some((l) => l.type === 'notice' && String(l.message).includes('power off')) ? true : undefined, 5);
    if (!exited) child.kill('SIGINT');
    await Promise.race([exit, timeout(15_000, `vmkeep run ${label} to exit after two SIGINTs`)]);
    const orphaned = exitSignal === 'SIGINT';
    if (orphaned) {
      log(`run overhead: vmkeep run ${label} was killed by the SIGINT sent right after its "running" notice; ending its QEMU pid ${qemuPid}`);
      await endQemu();
    } else {
      await waitForProcessExit(qemuPid, identity.startTime, 10_000).catch((error: unknown) => {
        throw new Error(`QEMU pid ${qemuPid} outlived vmkeep run ${label}: ${(error as Error).message}; its output:\n${output()}`);
      });
      await endQemu();
    }
    return { totalMs, launchMs, orphaned };
  } finally {
    await endCli();
  }
}

const CLI_INDEX = join(projectRoot(), 'dist', 'cli', 'index.js');

/** Time for a Node process to run `args` and exit 0. */
async function timeNode(args: string[], what: string): Promise<number> {
  const t0 = performance.now();
  const child = spawn(process.execPath, args, { stdio: 'ignore' });
  const [code] = (await Promise.race([once(child, 'exit'), timeout(30_000, what)])) as [number | null];
  if (code !== 0) throw new Error(`${what} exited with ${code}`);
  return performance.now() - t0;
}

/** (c) Node start-up plus loading the CLI's whole module graph, running nothing. */
const timeCliImport = (): Promise<number> =>
  timeNode(['--input-type=module', '-e', `await import(${JSON.stringify(CLI_INDEX)})`], 'importing dist/cli/index.js');

/** (d) Node start-up alone. */
const timeNodeStartup = (): Promise<number> => timeNode(['-e', '0'], 'node -e 0');

/** Connects as soon as QEMU listens; resolves once qmp_capabilities was answered. */
async function pollConnect(path: string, exited: () => boolean): Promise<QmpClient> {
  const deadline = performance.now() + READY_TIMEOUT_MS;
  for (;;) {
    try {
      return await connectQmp(path);
    } catch (error) {
      if (!isQmpError(error) || error.code !== 'CONNECT_FAILED') throw error;
      if (exited()) throw new Error(`bare QEMU exited before its monitor ${path} answered`);
      if (performance.now() > deadline) throw new Error(`bare QEMU's monitor ${path} did not answer within ${READY_TIMEOUT_MS} ms`);
    }
    await new Promise((resolve) => setTimeout(resolve, CONNECT_POLL_MS));
  }
}

/** (b) the same QEMU argv spawned directly: ready when a QMP client connected and negotiated. */
async function timeBareQemu(ctx: Ctx, build: (qmpSocket: string, serialLog: string) => ReturnType<typeof buildQemuCommand>, label: string): Promise<number> {
  const base = join(ctx.workDir, `bare-${label}`);
  const command = build(`${base}.sock`, `${base}.serial`);
  const logFd = openSync(`${base}.log`, 'a');
  const t0 = performance.now();
  let child: ChildProcess;
  try {
    child = spawn(command.binary, command.argv, { detached: true, stdio: ['ignore', logFd, logFd], env: { ...process.env, ...command.env } });
  } finally {
    closeSync(logFd);
  }
  let exited = false;
  const exit = new Promise<void>((resolve) => child.once('exit', () => { exited = true; resolve(); }));
  const pid = child.pid;
  if (pid === undefined) throw new Error(`could not start ${command.binary}`);
  const forget = ctx.cleanup.trackQemu(pid);
  let qmp: QmpClient | undefined;
  try {
    qmp = await pollConnect(`${base}.sock`, () => exited);
    const elapsed = performance.now() - t0;
    await qmp.quit();
    await Promise.race([exit, timeout(10_000, `bare QEMU pid ${pid} to exit after quit`)]);
    return elapsed;
  } finally {
    qmp?.close();
    await forget();
  }
}

export async function benchRunOverhead(ctx: Ctx): Promise<Section> {
  const specJson = { name: 'bench-run', kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append };
  const specPath = join(ctx.workDir, 'bench-run.json');
  await writeFile(specPath, JSON.stringify(specJson));
  const cacheDir = join(ctx.workDir, 'cli-cache');
  const installation = systemInstallation();
  const info = await probeInstallation(installation, { cacheDir });
  const spec = validateSpec(specJson);
  const machineType = resolveMachineType(spec.machine, info.machines);
  // The argv vmkeep run builds: launchVm always starts QEMU with -S and sends `cont` once ready.
  const build = (qmpSocket: string, serialLog: string) =>
    buildQemuCommand({ spec, uuid: randomUUID(), installation, machineType, paths: { qmpSocket, serialLog }, startPaused: true });

  log('run overhead: one untimed warm-up of each (page cache, probe cache)');
  await timeVmkeepRun(ctx, specPath, cacheDir, 'warmup');
  await timeBareQemu(ctx, build, 'warmup');
  await timeCliImport();
  await timeNodeStartup();

  const runs: RunSample[] = [];
  const a: number[] = [];
  const b: number[] = [];
  const c: number[] = [];
  const d: number[] = [];
  for (let i = 0; i < PAIRS; i++) {
    const run = await timeVmkeepRun(ctx, specPath, cacheDir, String(i));
    runs.push(run);
    a.push(run.totalMs);
    b.push(await timeBareQemu(ctx, build, String(i)));
    c.push(await timeCliImport());
    d.push(await timeNodeStartup());
    log(`run overhead: round ${i + 1}/${PAIRS}: vmkeep run ${formatMs(run.totalMs)} (launchVm ${run.launchMs} ms), bare QEMU ${formatMs(b[i] ?? NaN)}, ` +
      `CLI import ${formatMs(c[i] ?? NaN)}, node -e 0 ${formatMs(d[i] ?? NaN)}`);
  }
  const diffs = a.map((x, i) => x - (b[i] ?? NaN));
  const ratios = a.map((x, i) => x / (b[i] ?? NaN));
  const addedMs = median(diffs);
  const orphaned = runs.filter((r) => r.orphaned).length;
  const notes = [
    `Alternating a, b, c, d (${PAIRS} rounds after one untimed warm-up of each), each timed from spawn() in this process. ` +
      '(a) includes Node start-up, loading the CLI, spec validation, the cached installation probe, the spawn, ' +
      "spawnQemu's readiness probe, the second QMP connection and `cont`. (b) polls connect() every " +
      `${CONNECT_POLL_MS} ms. Both use the tiny guest's argv with -S (what vmkeep run builds).`,
    `Per round (ms, a/b/c/d): ${a.map((x, i) => [x, b[i], c[i], d[i]].map((v) => Math.round(v ?? NaN)).join('/')).join(', ')}.`,
  ];
  if (orphaned > 0) {
    notes.push(`In ${orphaned} of ${PAIRS} runs the SIGINT sent right after the "running" notice killed vmkeep run itself ` +
      '(its signal handler was not installed yet) and left its QEMU running; the bench ended those QEMUs by PID.');
  }
  return {
    title: '2. `vmkeep run` overhead (command start to QMP ready)',
    rows: [
      { what: '(a) `node dist/cli/main.js run SPEC --json` to the notice with the QEMU pid', n: PAIRS, median: formatMs(median(a)), p99: '—', target: '', met: '—' },
      { what: '(b) bare qemu-system-x86_64, same argv, to qmp_capabilities answered', n: PAIRS, median: formatMs(median(b)), p99: '—', target: '', met: '—' },
      { what: 'added by vmkeep: median of per-pair (a − b)', n: PAIRS, median: formatMs(addedMs), p99: '—', target: `< ${TARGET_ADDED_MS} ms`, met: met(addedMs < TARGET_ADDED_MS) },
      { what: 'ratio: median of per-pair (a / b)', n: PAIRS, median: `${median(ratios).toFixed(2)}×`, p99: '—', target: '', met: '—' },
      { what: 'of (a): launchVm alone (the CLI\'s own "ready in N ms")', n: PAIRS, median: formatMs(median(runs.map((r) => r.launchMs))), p99: '—', target: '', met: '—' },
      { what: '(c) Node start-up + importing dist/cli/index.js (the CLI\'s module graph, nothing run)', n: PAIRS, median: formatMs(median(c)), p99: '—', target: '', met: '—' },
      { what: '(d) Node start-up alone (`node -e 0`)', n: PAIRS, median: formatMs(median(d)), p99: '—', target: '', met: '—' },
    ],
    notes,
  };
}
