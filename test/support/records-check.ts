// The host-side checker of what the test guest's writer put on its disk (test/guest/build-guest.sh):
// every record from 1 to the last one the console printed ("GUEST WROTE n") is there, whole
// (its checksum matches), in order, none twice, none torn; and e2fsck finds the filesystem clean.
import { execFileSync, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export const RECORD_BYTES = 64;
const RECORD_RE = /^R (\d{10}) (\d{12}) (\d{10}) {27}\n$/;
const SBIN_PATH = `${process.env.PATH ?? ''}:/usr/sbin:/sbin`;

/** The writer's checksum of a record's content (the same formula as the guest's shell). */
export function recordCheck(seq: number, time: number): number {
  return Number((BigInt(seq) * 2654435761n + BigInt(time) * 40503n + 12345n) % 4294967291n);
}

export interface RecordsVerdict {
  ok: boolean;
  /** Whole records in the file. */
  count: number;
  /** The highest sequence number found whole. */
  last: number;
  problems: string[];
}

/** Checks the records file's bytes against the last number the console printed (pure). */
export function checkRecords(data: Buffer, lastPrinted: number): RecordsVerdict {
  const problems: string[] = [];
  if (data.length % RECORD_BYTES !== 0) problems.push(`the file is ${data.length} bytes, not a whole number of ${RECORD_BYTES}-byte records: the last one is torn`);
  let expected = 1;
  let count = 0;
  let last = 0;
  for (let offset = 0; offset + RECORD_BYTES <= data.length; offset += RECORD_BYTES) {
    const text = data.subarray(offset, offset + RECORD_BYTES).toString('latin1');
    const m = RECORD_RE.exec(text);
    const at = `record at byte ${offset}`;
    if (m === null) {
      problems.push(`${at} is torn or overwritten: ${JSON.stringify(text.slice(0, 40))}`);
      expected++;
      continue;
    }
    const seq = Number(m[1]);
    const time = Number(m[2]);
    if (Number(m[3]) !== recordCheck(seq, time)) problems.push(`${at} (seq ${seq}) fails its checksum`);
    if (seq < expected) problems.push(`${at}: seq ${seq} is duplicated (expected ${expected})`);
    else if (seq > expected) problems.push(`${at}: seq ${expected}..${seq - 1} missing`);
    expected = seq + 1;
    count++;
    last = Math.max(last, seq);
  }
  if (last < lastPrinted) problems.push(`the console printed GUEST WROTE ${lastPrinted}, but the file ends at ${last}: acknowledged records ${last + 1}..${lastPrinted} are lost`);
  return { ok: problems.length === 0, count, last, problems };
}

/** The highest n of "GUEST WROTE n" in a serial log (0 if none). */
export function lastWrote(serialLog: string): number {
  let last = 0;
  for (const m of readFileSync(serialLog, 'utf8').matchAll(/GUEST WROTE (\d+)/g)) last = Math.max(last, Number(m[1]));
  return last;
}

/** Resolves with the last acknowledged number once the console shows GUEST WROTE `n` (or more). */
export async function waitForWrote(serialLog: string, n: number, timeoutMs = 120_000): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const last = lastWrote(serialLog);
    if (last >= n) return last;
    if (Date.now() > deadline) throw new Error(`waited ${timeoutMs} ms for GUEST WROTE ${n} in ${serialLog}; the last was ${last}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Every "GUEST WROTE n" in order (to find gaps or a restart of the sequence). */
export function wroteSequence(serialLog: string): number[] {
  return [...readFileSync(serialLog, 'utf8').matchAll(/GUEST WROTE (\d+)/g)].map((m) => Number(m[1]));
}

export interface ImageVerdict extends RecordsVerdict {
  /** e2fsck -fn's exit code (0: clean) and output. */
  fsck: { code: number; output: string };
}

/**
 * Reads /records out of a (stopped VM's) image: a raw copy through qemu-img (-U: a test may look
 * while a QEMU still has it open), then debugfs; checks it and runs e2fsck -fn on the copy.
 */
export function checkImage(image: string, format: 'raw' | 'qcow2', lastPrinted: number): ImageVerdict {
  const dir = mkdtempSync(join(tmpdir(), 'vmkeep-records-'));
  try {
    const raw = join(dir, 'copy.raw');
    execFileSync('qemu-img', ['convert', '-U', '-f', format, '-O', 'raw', image, raw]);
    const out = join(dir, 'records');
    execFileSync('debugfs', ['-R', `dump /records ${out}`, raw], { env: { PATH: SBIN_PATH }, stdio: 'ignore' });
    let data: Buffer;
    try {
      data = readFileSync(out);
    } catch {
      data = Buffer.alloc(0);
    }
    const fsck = spawnSync('e2fsck', ['-fn', raw], { env: { PATH: SBIN_PATH }, encoding: 'utf8' });
    const verdict = checkRecords(data, lastPrinted);
    const code = fsck.status ?? -1;
    if (code !== 0) verdict.problems.push(`e2fsck -fn exited ${code}: ${(fsck.stdout + fsck.stderr).trim().split('\n').slice(-5).join(' | ')}`);
    return { ...verdict, ok: verdict.problems.length === 0, fsck: { code, output: fsck.stdout + fsck.stderr } };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
