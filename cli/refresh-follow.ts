import type { Writable } from 'node:stream';
import type { DaemonEvent, RefreshJobRequest } from '../daemon/index.js';
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
    jobId = job.id;
    if (io.json) io.stdout.write(`${JSON.stringify({ type: 'refresh-job', job })}\n`);
    else io.stderr.write(`${printable(`vmkeep: refresh ${job.id}: ${job.vms.length} VM(s)${job.vms.length > 0 ? ` (${job.vms.join(', ')})` : ''}, ${job.parallel} at a time`)}\n`);
    if (job.vms.length === 0) controller.abort();
    for (const event of early.splice(0)) onEvent(event);
    await stream;
    clearBar();
    if (detached) {
      io.stderr.write(`${printable(`vmkeep: stopped following; refresh ${job.id} goes on in vmkeepd (vmkeep events shows it)`)}\n`);
      return EXIT_DETACHED;
    }
    const final = await api.refreshJob(job.id);
    if (io.json) io.stdout.write(`${JSON.stringify({ type: 'result', job: final })}\n`);
    else io.stdout.write(`${formatJobSummary(final)}\n`);
    return final.results.every((r) => r.ok) ? 0 : 1;
  } finally {
    offSignal();
    controller.abort();
  }
}
