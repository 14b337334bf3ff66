import type { Writable } from 'node:stream';
import { DaemonError, type DaemonErrorCode, type DaemonEvent, type RefreshJob, type RefreshJobRequest } from '../daemon/index.js';
import { formatJobSummary, formatRefreshEvent, progressBar } from './refresh-view.js';
import { printable } from './table.js';
import type { DaemonApi } from './vm-commands.js';

export interface FollowIo {
  json: boolean;
  stdout: Writable;
  stderr: Writable;
  onSignal(listener: (signal: NodeJS.Signals) => void): () => void;
}

/** Exit code when Ctrl-C ends the following: the job goes on inside vmkeepd. */
const EXIT_DETACHED = 130;

/**
 * Starts a rolling refresh and follows it on the event stream until it ends: a line per VM
 * step and a progress bar on a terminal, or each event as a JSON line. Subscribed before the
 * job begins, so no step is missed. Resolves to the exit code: 0 when every VM succeeded.
 */
export async function followRefreshJob(api: DaemonApi, request: RefreshJobRequest, io: FollowIo): Promise<number> {
  const controller = new AbortController();
  let detached = false;
  const offSignal = io.onSignal(() => {
    detached = true;
    controller.abort();
  });
  const tty = !io.json && (io.stderr as { isTTY?: boolean }).isTTY === true;
  let jobId: string | undefined;
  const early: DaemonEvent[] = [];
  let bar = '';
  const clearBar = (): void => {
    if (bar !== '') io.stderr.write(`\r${' '.repeat(bar.length)}\r`);
    bar = '';
  };
  const show = (event: DaemonEvent): void => {
    if (io.json) {
      io.stdout.write(`${JSON.stringify(event)}\n`);
    } else {
      const line = formatRefreshEvent(event);
      clearBar();
      if (line !== undefined) io.stdout.write(`${line}\n`);
      if (tty && event.progress) {
        bar = progressBar(event.progress.done, event.progress.total, event.progress.failed);
        io.stderr.write(bar);
      }
    }
    if (event.step === 'job-done') controller.abort();
  };
  const onEvent = (event: DaemonEvent): void => {
    if (event.type !== 'refresh') return;
    if (jobId === undefined) early.push(event);
    else if (event.job === jobId) show(event);
  };
  try {
    let opened!: () => void;
    const open = new Promise<void>((resolve) => (opened = resolve));
    const stream = api.events(onEvent, { signal: controller.signal, onOpen: opened });
    await Promise.race([open, stream]);
    const job = await api.startRefreshJob(request);
    if (io.json) io.stdout.write(`${JSON.stringify({ type: 'refresh-job', job })}\n`);
    else io.stderr.write(`${printable(`vmkeep: refresh ${job.id}: ${job.vms.length} VM(s)${job.vms.length > 0 ? ` (${job.vms.join(', ')})` : ''}, ${request.parallel ?? 1} at a time`)}\n`);
    // Events keep arriving in `early` until jobId is set: the job's lines come after these.
    await reportSkipped(api, request, job.vms, io);
    jobId = job.id;
    if (job.vms.length === 0) controller.abort();
    for (const event of early.splice(0)) onEvent(event);
    await stream;
    clearBar();
    if (detached) {
      io.stderr.write(`${printable(`vmkeep: stopped following; refresh ${job.id} goes on in vmkeepd (vmkeep events shows it)`)}\n`);
      return EXIT_DETACHED;
    }
    const done = await api.finished(job);
    const final = done.result as RefreshJob | undefined;
    if (final === undefined) {
      // No per-VM results: the job ended before it ran (vmkeepd restarted meanwhile).
      throw new DaemonError((done.error?.code ?? 'INTERNAL') as DaemonErrorCode, `refresh ${job.id} ${done.status}: ${done.error?.message ?? 'no result'}`);
    }
    if (io.json) io.stdout.write(`${JSON.stringify({ type: 'result', job: final, status: done.status })}\n`);
    else io.stdout.write(`${formatJobSummary(final)}\n`);
    return done.status === 'succeeded' && final.results.every((r) => r.ok) ? 0 : 1;
  } finally {
    offSignal();
    controller.abort();
  }
}

/**
 * `--stale` without --strategy moves each VM by its own policy, so stale VMs whose policy is
 * manual are not in the job: name them and say how to include them, rather than a bare "0 VM(s)".
 */
async function reportSkipped(api: DaemonApi, request: RefreshJobRequest, inJob: readonly string[], io: FollowIo): Promise<void> {
  if (request.stale !== true || request.strategy !== undefined) return;
  const status = await api.upgradeStatus();
  const skipped = status.vms.filter((v) => v.stale && !inJob.includes(v.name)).map((v) => ({ name: v.name, policy: v.policy }));
  if (skipped.length === 0) return;
  const hint = 'refresh them with --strategy migrate (live) or --strategy reboot, or give them a policy';
  if (io.json) {
    io.stdout.write(`${JSON.stringify({ type: 'skipped', vms: skipped, hint })}\n`);
  } else {
    const names = skipped.map((v) => `${v.name} (${v.policy})`).join(', ');
    io.stderr.write(`${printable(`vmkeep: ${skipped.length} stale VM(s) skipped by their policy: ${names}; ${hint}`)}\n`);
  }
}
