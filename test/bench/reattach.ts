// Benchmark 5: vmkeepd as a service with N paused VMs: start-up to READY, `systemctl restart`
// (READY comes once every monitor answered), a SIGKILL with Restart=on-failure, `vmkeep list`
// and `--version`, and the daemon's memory. Every time target is a ratio against a floor
// measured in the same run, alternating with it: `node -e 0` spawned from here, or run as a
// oneshot service through the same systemctl path.
import { spawn } from 'node:child_process';
import { open, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { ApiClient } from '../../daemon/index.js';
import { DaemonHost, DAEMON_UNIT } from '../support/daemon-host.js';
import type { GuestImage } from '../support/guest.js';
import { projectRoot } from '../support/paths.js';
import { log, met, waitUntil, type Cleanup, type Row, type Section } from './common.js';
import { profileDaemonStart, type StartProfile } from './start-profile.js';
import { formatMs, median } from './stats.js';

const ROUNDS = 7;
const KILL_ROUNDS = 3;
const CREATE_CONCURRENCY = 2;
const LEVELS = [0, 1, 10, 100];
const FALLBACK_TOP = 50;
/** How long after READY the daemon is left alone before its steady-state RSS is read. */
const SETTLE_MS = 10_000;
const FLOOR_UNIT = 'vmkeep-floor.service';
const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');
const VMKEEPD = join(projectRoot(), 'dist', 'cli', 'vmkeepd.js');

// The targets, as allowances over the floor of the same run.
const READY_OVER_FLOOR_MS = 60;
const RESTART10_OVER_FLOOR_MS = 80;
const RESTART100_MS = 600;
const KILL10_OVER_FLOOR_MS = 60;
const LIST_OVER_FLOOR_MS = 50;
const VERSION_OVER_FLOOR_MS = 30;
const RSS_IDLE_MB = 55;
const RSS_100_MB = 65;

/** The last JSON log line whose msg starts with `msg`, written after byte `from` of the console log. */
async function logLineAfter<T>(consoleLog: string, from: number, msg: string): Promise<(T & { msg: string }) | undefined> {
  const handle = await open(consoleLog, 'r');
  let text: string;
  try {
    const { size } = await handle.stat();
    const buffer = Buffer.alloc(Math.max(0, size - from));
    await handle.read(buffer, 0, buffer.length, from);
    text = buffer.toString('utf8');
  } finally {
    await handle.close();
  }
  let found: (T & { msg: string }) | undefined;
  for (const line of text.split(/\r?\n/)) {
    const start = line.indexOf('{');
    if (start < 0 || !line.includes(msg)) continue;
    try {
      const entry = JSON.parse(line.slice(start)) as T & { msg?: string };
      if (entry.msg?.startsWith(msg)) found = entry as T & { msg: string };
    } catch {
      // a console line that only looks like it
    }
  }
  return found;
}

/** VmRSS (now) and VmHWM (the peak so far) of the service's main process, in MB (10^6 bytes). */
async function daemonMemoryMB(daemon: DaemonHost): Promise<{ rss: number; peak: number }> {
  const hostPid = daemon.host.hostPidOf(await mainPid(daemon));
  if (hostPid === null) throw new Error("no host PID for vmkeepd's MainPID");
  const status = await readFile(`/proc/${hostPid}/status`, 'utf8');
  const mb = (field: string): number => {
    const kib = new RegExp(`^${field}:\\s+(\\d+) kB$`, 'm').exec(status)?.[1];
    if (kib === undefined) throw new Error(`no ${field} in /proc/${hostPid}/status`);
    return (Number(kib) * 1024) / 1e6;
  };
  return { rss: mb('VmRSS'), peak: mb('VmHWM') };
}

async function mainPid(daemon: DaemonHost): Promise<number> {
  return Number((await daemon.systemctl('show', '-p', 'MainPID', '--value', DAEMON_UNIT)).trim());
}

/** Wall time of a process spawned from here, to its exit; throws on a non-zero exit. */
function timeSpawn(args: string[], anyExit = false): Promise<number> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    child.once('error', reject);
    child.once('exit', (code) => {
      const ms = performance.now() - t0;
      if (code === 0 || anyExit) resolve(ms);
      else reject(new Error(`node ${args.join(' ')} exited ${code}: ${stderr}`));
    });
  });
}

const floorUnit = `[Unit]\nDescription=Node start-up floor for the bench\n[Service]\nType=oneshot\nExecStart=${process.execPath} -e 0\n`;

const row = (what: string, n: number | string, value: string, target = '', ok?: boolean): Row => ({
  what, n, median: value, p99: '—', target, met: ok === undefined ? '—' : met(ok),
});

export async function benchReattach(ctx: { guest: GuestImage; cleanup: Cleanup; budgetMs: number }): Promise<Section[]> {
  const began = performance.now();
  const daemon = await DaemonHost.boot({ name: `benchd-${process.pid}` });
  // Shutting the private systemd down kills its whole pid namespace: every QEMU created here.
  ctx.cleanup.add(`vmkeepd host ${daemon.host.name}`, () => daemon.shutdown());
  await daemon.host.writeUnit(FLOOR_UNIT, floorUnit);

  let created = 0;
  const createMs: number[] = [];
  const createUpTo = async (n: number): Promise<void> => {
    const next = async (): Promise<void> => {
      while (created < n) {
        const name = `r${created++}`;
        const t0 = performance.now();
        await daemon.api.create({ name, kernel: ctx.guest.kernel, initrd: ctx.guest.initrd, append: ctx.guest.append, memoryMiB: 32 });
        // Paused at once, so 100 TCG guests do not compete for the 2 cores.
        await daemon.api.qmp(name, 'stop');
        createMs.push(performance.now() - t0);
      }
    };
    await Promise.all(Array.from({ length: CREATE_CONCURRENCY }, next));
    // The daemon records "paused" when QEMU's STOP event reaches it.
    let states: string[] = [];
    await waitUntil(`vmkeepd to list ${n} paused VMs`, 30_000, async () => {
      states = (await daemon.api.list()).map((v) => v.state);
      return states.length === n && states.every((s) => s === 'paused') ? true : undefined;
    }).catch((error: unknown) => {
      throw new Error(`${(error as Error).message}; it lists: ${JSON.stringify(states)}`);
    });
    log(`reattach: ${n} paused VMs (median create+stop ${formatMs(median(createMs))})`);
  };

  const rows: Row[] = [];
  const memRows: Row[] = [];
  const notes: string[] = [];
  let profile: StartProfile | undefined;
  // BENCH_BASELINE_VMKEEPD=/path/to/an/older/dist/cli/vmkeepd.js: profile that build's start too
  // (BENCH_BASELINE_LABEL names it in the report).
  const baseline = process.env['BENCH_BASELINE_VMKEEPD'];
  let baselineProfile: StartProfile | undefined;
  const levels = [...LEVELS];
  for (let li = 0; li < levels.length; li++) {
    const n = levels[li] ?? 0;
    const top = li === levels.length - 1;
    if (n > created) {
      // Shrinks the top level if the creates left would not fit the time budget.
      const perVm = createMs.length > 0 ? median(createMs) / CREATE_CONCURRENCY : 0;
      const left = ctx.budgetMs - (performance.now() - began);
      if (top && n > FALLBACK_TOP && perVm * (n - created) > left * 0.6) {
        notes.push(`Creating ${n} VMs would not fit the time budget (≈${Math.round(perVm)} ms per VM): measured up to N=${FALLBACK_TOP} instead.`);
        levels[li] = FALLBACK_TOP;
        li--;
        continue;
      }
      await createUpTo(n);
    }
    const reattachMs: number[] = [];
    const restartMs: number[] = [];
    const floorMs: number[] = [];
    const readyMs: number[] = [];
    const nodeFloorMs: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      nodeFloorMs.push(await timeSpawn(['-e', '0']));
      let t0 = performance.now();
      await daemon.systemctl('restart', FLOOR_UNIT);
      floorMs.push(performance.now() - t0);
      const from = (await stat(daemon.host.consoleLog)).size;
      t0 = performance.now();
      await daemon.restart();
      restartMs.push(performance.now() - t0);
      // The console log is written through a pty by `script`: a line may land a moment after READY.
      const line = await waitUntil(`the "reattached" line in the daemon's log after restart ${r + 1} at N=${n}`, 5_000, () =>
        logLineAfter<{ vms: number; ms: number; states?: Record<string, number> }>(daemon.host.consoleLog, from, 'reattached '));
      if (line.vms !== n || (n > 0 && line.states?.['paused'] !== n)) {
        throw new Error(`after restart ${r + 1} at N=${n} the daemon reattached ${line.vms} VM(s), states ${JSON.stringify(line.states)}`);
      }
      reattachMs.push(line.ms);
      const ready = await waitUntil('the "vmkeepd ready" line in the daemon\'s log', 5_000, () =>
        logLineAfter<{ startupMs?: number }>(daemon.host.consoleLog, from, 'vmkeepd ready')).catch(() => undefined);
      if (typeof ready?.startupMs === 'number') readyMs.push(ready.startupMs);
    }
    await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
    const mem = await daemonMemoryMB(daemon);
    const floor = median(floorMs);
    log(`reattach: N=${n}: restart ${formatMs(median(restartMs))} (floor ${formatMs(floor)}), ready at ${formatMs(median(readyMs))}, RSS ${mem.rss.toFixed(1)} MB (peak ${mem.peak.toFixed(1)})`);
    rows.push(row(`N=${n}: floor: \`systemctl restart\` of a oneshot \`node -e 0\` service`, ROUNDS, formatMs(floor)));
    const restartTarget = n === 10 ? floor + RESTART10_OVER_FLOOR_MS : n >= 100 ? RESTART100_MS : undefined;
    rows.push(row(
      `N=${n}: \`systemctl restart vmkeepd\` wall time (returns at READY=1, after every monitor answered)`, ROUNDS, formatMs(median(restartMs)),
      n === 10 ? `≤ floor + ${RESTART10_OVER_FLOOR_MS} ms (${formatMs(floor + RESTART10_OVER_FLOOR_MS)})` : n >= 100 ? `< ${RESTART100_MS} ms` : '',
      restartTarget === undefined ? undefined : median(restartMs) <= restartTarget,
    ));
    rows.push(row(`N=${n}: the same minus the floor`, ROUNDS, formatMs(median(restartMs.map((ms, i) => ms - (floorMs[i] ?? NaN))))));
    rows.push(row(`N=${n}: reattach all (daemon's own "reattached N VM(s)" ms)`, ROUNDS, formatMs(median(reattachMs))));
    const nodeFloor = median(nodeFloorMs);
    if (n === 1) rows.push(row('N=1: floor: `node -e 0` spawned from the bench, to its exit', ROUNDS, formatMs(nodeFloor)));
    if (readyMs.length > 0) {
      rows.push(row(`N=${n}: vmkeepd process start to READY=1 (its own startupMs)`, readyMs.length, formatMs(median(readyMs)),
        n === 1 ? `≤ floor + ${READY_OVER_FLOOR_MS} ms (${formatMs(nodeFloor + READY_OVER_FLOOR_MS)})` : '',
        n === 1 ? median(readyMs) <= nodeFloor + READY_OVER_FLOOR_MS : undefined));
    }
    memRows.push(row(`N=${n}: vmkeepd RSS, steady (VmRSS ${SETTLE_MS / 1000} s after READY)`, 1, `${mem.rss.toFixed(1)} MB`,
      n === 0 ? `≤ ${RSS_IDLE_MB} MB` : n >= 100 ? `≤ ${RSS_100_MB} MB` : '',
      n === 0 ? mem.rss <= RSS_IDLE_MB : n >= 100 ? mem.rss <= RSS_100_MB : undefined));
    memRows.push(row(`N=${n}: vmkeepd RSS, start-up peak (VmHWM)`, 1, `${mem.peak.toFixed(1)} MB`));

    if (n === 1) {
      profile = await profileAt(daemon, VMKEEPD);
      if (baseline !== undefined) baselineProfile = await profileAt(daemon, baseline);
    }
    if (n === 10) rows.push(...(await killAndCli(daemon)));
  }

  const targets: Row[] = [];
  const section: Section = { title: '5. Daemon start-up, restart, reattach, CLI and memory', rows: targets, notes };
  targets.push(...rows);
  notes.unshift(
    `vmkeepd as a Type=notify service in a private systemd (test/support/daemon-host.ts), with the shipped unit (Restart=on-failure, RestartSec=1). VMs: the tiny guest with 32 MiB, ` +
      `created through the API ${CREATE_CONCURRENCY} at a time and paused at once with QMP \`stop\` (median create+stop ${formatMs(median(createMs))}). ` +
      `${ROUNDS} rounds per N, each a restart of the floor service then of vmkeepd (alternating); each checks that the log line reports N VMs, all paused. ` +
      'The floor service runs `node -e 0` as Type=oneshot, so its `systemctl restart` returns when Node has started and exited, through the same nsenter + systemctl path. ' +
      "vmkeepd's startupMs is performance.now() at READY (milliseconds since its process started, as Node counts them).",
  );
  const memory: Section = {
    title: '5b. vmkeepd memory',
    rows: memRows,
    notes: [
      `Read from /proc/PID/status of the service's MainPID after the last restart of each N and ${SETTLE_MS / 1000} s without requests (MB = 10^6 bytes): ` +
        'VmRSS is the steady state, VmHWM the peak reached during start-up.',
    ],
  };
  const sections = [section, memory];
  if (profile !== undefined) {
    sections.push({
      title: '5c. Where one vmkeepd start (N=1) spends its CPU until READY',
      rows: profile.costs.slice(0, 8).map((c) => row(c.owner, 1, formatMs(c.ms))),
      notes: [
        `\`node --cpu-prof\` of one vmkeepd started by hand inside the same private systemd on the same state (the service stopped meanwhile); READY came ${formatMs(profile.readyMs)} after its process start. ` +
          'Each sample is charged to the nearest frame of a package or a vmkeep folder; the rest is Node\'s module loader, V8\'s compiler ("(program)"), the garbage collector or other Node internals (test/bench/start-profile.ts).',
      ],
    });
  }
  const missed = [...targets, ...memRows].filter((r) => r.met === 'no');
  if (missed.length > 0) {
    const top = profile?.costs.slice(0, 3).map((c) => `${c.owner} ${formatMs(c.ms)}`).join(', ');
    sections.push({
      title: '5e. Targets not met in this run',
      rows: missed,
      notes: [
        'Each is measured against a floor of the same run (the rows above), so machine load moves both. ' +
          (top === undefined ? '' : `Where one start's CPU time went (5c): ${top}; `) +
          "Node's own start and module loading are what is left of the start-up cost once yargs, pino, xml2js and execa are out of the daemon's path; " +
          'per-VM reattach is bounded by each QEMU answering three QMP messages, which a loaded 2-core machine schedules late.',
      ],
    });
  }
  if (baselineProfile !== undefined) {
    sections.push({
      title: '5d. The same for the baseline build',
      rows: baselineProfile.costs.slice(0, 8).map((c) => row(c.owner, 1, formatMs(c.ms))),
      notes: [`${process.env['BENCH_BASELINE_LABEL'] ?? baseline} (BENCH_BASELINE_VMKEEPD), profiled right after the one above on the same state: READY came ${formatMs(baselineProfile.readyMs)} after its process start.`],
    });
  }
  return sections;

  async function profileAt(d: DaemonHost, program: string): Promise<StartProfile> {
    await d.stop();
    try {
      return await profileDaemonStart(d.host, program, d.dir);
    } finally {
      await d.start();
    }
  }

  async function killAndCli(d: DaemonHost): Promise<Row[]> {
    const out: Row[] = [];
    // SIGKILL: from the new process's start (systemd's monotonic timestamp) to a list of every VM.
    const client = new ApiClient({ socketPath: d.socket, timeoutMs: 2_000 });
    const killMs: number[] = [];
    const killFloor: number[] = [];
    for (let r = 0; r < KILL_ROUNDS; r++) {
      killFloor.push(await timeSpawn(['-e', '0']));
      const old = await mainPid(d);
      await d.systemctl('kill', '--signal=SIGKILL', DAEMON_UNIT);
      const listedAt = await waitUntil('the restarted vmkeepd to list every VM', 30_000, async () => {
        try {
          const info = await client.info();
          if (info.pid === old) return undefined;
          const vms = await client.list();
          return vms.length === created ? process.hrtime.bigint() : undefined;
        } catch {
          return undefined;
        }
      }, 5);
      const startUs = BigInt((await d.systemctl('show', '-p', 'ExecMainStartTimestampMonotonic', '--value', DAEMON_UNIT)).trim());
      killMs.push(Number(listedAt / 1000n - startUs) / 1000);
    }
    const kf = median(killFloor);
    out.push(row('floor: `node -e 0` spawned from the bench, to its exit', KILL_ROUNDS, formatMs(kf)));
    out.push(row(`N=${created}: SIGKILL, Restart=on-failure: new process start to every VM listed`, KILL_ROUNDS, formatMs(median(killMs)),
      `≤ floor + ${KILL10_OVER_FLOOR_MS} ms (${formatMs(kf + KILL10_OVER_FLOOR_MS)})`, median(killMs) <= kf + KILL10_OVER_FLOOR_MS));

    // The CLI, alternating with its floor.
    const floor: number[] = [];
    const list: number[] = [];
    const version: number[] = [];
    for (let r = 0; r < ROUNDS; r++) {
      floor.push(await timeSpawn(['-e', '0']));
      list.push(await timeSpawn([CLI, 'list', '--socket', d.socket]));
      // Any exit: a build without --version still shows what loading the CLI costs.
      version.push(await timeSpawn([CLI, '--version'], true));
    }
    const f = median(floor);
    out.push(row('floor: `node -e 0` spawned from the bench, to its exit', ROUNDS, formatMs(f)));
    out.push(row(`\`vmkeep list\` (${created} VMs), spawn to exit`, ROUNDS, formatMs(median(list)),
      `≤ floor + ${LIST_OVER_FLOOR_MS} ms (${formatMs(f + LIST_OVER_FLOOR_MS)})`, median(list) <= f + LIST_OVER_FLOOR_MS));
    out.push(row('`vmkeep --version`, spawn to exit', ROUNDS, formatMs(median(version)),
      `≤ floor + ${VERSION_OVER_FLOOR_MS} ms (${formatMs(f + VERSION_OVER_FLOOR_MS)})`, median(version) <= f + VERSION_OVER_FLOOR_MS));
    return out;
  }
}
