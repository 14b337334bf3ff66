// vmkeepd's lines as structured journal entries (ARCHITECTURE.md, "Logs"): with fields of
// their own, `journalctl -u vmkeepd VM=web1` shows only web1's lines. The journal's native
// protocol is a unix datagram socket, which Node cannot write to; so one small perl (perl-base
// is part of every Debian and Ubuntu system, as for peer-cred.ts) is started with the logger
// and sends each entry it reads from its stdin, acknowledging each with one byte. Whatever it
// did not acknowledge when it fails or dies is written to stderr, with the `<N>` prefix, in
// order: a line is never lost, at worst written twice.
import { spawn, type ChildProcess } from 'node:child_process';
import { linePriority } from './journal-priority.js';

/** Where journald listens for native entries. */
export const JOURNAL_SOCKET = '/run/systemd/journal/socket';

/**
 * The journal fields of one pino line (pure). Besides MESSAGE, PRIORITY (the same mapping as
 * the `<N>` prefix), SYSLOG_IDENTIFIER and SYSLOG_PID (the entry's own _PID is the helper's),
 * only these, each when the line has it: VM (`vm`), OPERATION (`operation`), CODE (`code`, or
 * the error's `err.code`) and ERRNO (the error's `err.errno`, positive as the journal has it).
 * VMKEEP_JSON keeps the whole line, so nothing of it is lost.
 */
export function journalFields(line: string, identifier: string): Array<[string, string]> {
  const json = line.endsWith('\n') ? line.slice(0, -1) : line;
  let parsed: Record<string, unknown> = {};
  try {
    const value: unknown = JSON.parse(json);
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) parsed = value as Record<string, unknown>;
  } catch {
    // Not pino's JSON: sent as it is, at info.
  }
  const err = typeof parsed['err'] === 'object' && parsed['err'] !== null ? parsed['err'] as Record<string, unknown> : {};
  const text = (value: unknown): string | undefined => (typeof value === 'string' && value !== '' ? value : undefined);
  const fields: Array<[string, string | undefined]> = [
    ['MESSAGE', text(parsed['msg']) ?? json],
    ['PRIORITY', String(linePriority(json))],
    ['SYSLOG_IDENTIFIER', identifier],
    ['SYSLOG_PID', typeof parsed['pid'] === 'number' ? String(parsed['pid']) : undefined],
    ['VM', text(parsed['vm'])],
    ['OPERATION', text(parsed['operation'])],
    ['CODE', text(parsed['code']) ?? text(err['code'])],
    ['ERRNO', typeof err['errno'] === 'number' && err['errno'] !== 0 ? String(Math.abs(err['errno'])) : undefined],
    ['VMKEEP_JSON', json],
  ];
  return fields.filter((field): field is [string, string] => field[1] !== undefined);
}

/**
 * One entry of the native protocol (pure): `NAME=value` lines; a value holding a newline in the
 * binary-safe form (NAME, newline, its byte length as 64-bit little-endian, the value, newline).
 */
export function encodeJournalEntry(fields: ReadonlyArray<readonly [string, string]>): Buffer {
  const parts: Buffer[] = [];
  for (const [name, value] of fields) {
    if (!value.includes('\n')) {
      parts.push(Buffer.from(`${name}=${value}\n`));
      continue;
    }
    const bytes = Buffer.from(value);
    const length = Buffer.alloc(8);
    length.writeBigUInt64LE(BigInt(bytes.length));
    parts.push(Buffer.from(`${name}\n`), length, bytes, Buffer.from('\n'));
  }
  return Buffer.concat(parts);
}

/**
 * The helper: each entry comes on stdin after its length (32-bit little-endian); one byte on
 * stdout says it was sent. It ignores SIGTERM and SIGINT (a service stop signals the whole
 * control group at once) and ends at stdin's end, so vmkeepd's last lines are sent once vmkeepd
 * exited. A failed send ends it, with the reason on its stderr.
 */
const HELPER = '$SIG{TERM} = $SIG{INT} = $SIG{PIPE} = "IGNORE"; use Socket; my $path = shift; '
  + 'socket(my $s, PF_UNIX, SOCK_DGRAM, 0) or die "socket: $!\\n"; my $to = pack_sockaddr_un($path); binmode STDIN; '
  + 'while (read(STDIN, my $h, 4) == 4) { my $n = unpack("V", $h); read(STDIN, my $e, $n) == $n or last; '
  + 'defined send($s, $e, 0, $to) or die "send to $path: $!\\n"; syswrite(STDOUT, "."); }';

export interface JournalSinkOptions {
  /** SYSLOG_IDENTIFIER of every entry. */
  identifier: string;
  /** Where a line goes when the journal cannot take it (stderr with its `<N>` prefix). */
  fallback: (line: string) => void;
  /** Called once, after the switch to the fallback, with the reason. */
  onFallback: (reason: string) => void;
  socketPath?: string;
  perl?: string;
}

/**
 * A pino destination sending each line to the journal through the helper, started here and not
 * awaited: lines written before it runs wait in the pipe. Neither the helper nor its pipes keep
 * vmkeepd's event loop alive.
 */
export function journalSink(options: JournalSinkOptions): { write(line: string): void } {
  const perl = options.perl ?? 'perl';
  const socketPath = options.socketPath ?? JOURNAL_SOCKET;
  /** Lines handed to the helper that it has not acknowledged yet, oldest first. */
  const unacknowledged: string[] = [];
  let helper: ChildProcess | undefined;
  let failed = false;
  const fail = (reason: string): void => {
    if (failed) return;
    failed = true;
    helper = undefined;
    for (const line of unacknowledged.splice(0)) options.fallback(line);
    options.onFallback(reason);
  };
  try {
    helper = spawn(perl, ['-e', HELPER, socketPath], { stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (error) {
    // Node throws at once for some failures (others come as an 'error' event below).
    queueMicrotask(() => fail(`cannot run ${perl}: ${(error as Error).message}`));
    return { write: options.fallback };
  }
  let helperErrors = '';
  const started = helper;
  started.once('error', (error) => fail(`cannot run ${perl}: ${error.message}`));
  // 'close' comes after the helper's stdout ended: every acknowledgement it wrote was counted.
  started.once('close', (code, signal) => fail(`the journal helper (${perl}) ended (${signal ?? `exit ${String(code)}`})${helperErrors === '' ? '' : `: ${helperErrors.trim()}`}`));
  started.stdout?.on('data', (chunk: Buffer) => unacknowledged.splice(0, chunk.length));
  started.stderr?.setEncoding('utf8').on('data', (text: string) => { helperErrors = `${helperErrors}${text}`.slice(-500); });
  started.stdin?.on('error', () => undefined);
  started.unref();
  for (const stream of [started.stdin, started.stdout, started.stderr]) (stream as unknown as { unref?: () => void } | null)?.unref?.();
  // A helper that could not be spawned (no perl) has no PID: stderr from the first line on; its
  // 'error' event, next, says why.
  if (started.pid === undefined) helper = undefined;
  return {
    write(line) {
      if (helper?.stdin == null) {
        options.fallback(line);
        return;
      }
      const entry = encodeJournalEntry(journalFields(line, options.identifier));
      const length = Buffer.alloc(4);
      length.writeUInt32LE(entry.length);
      unacknowledged.push(line);
      // Written at once while the pipe has room (libuv tries the write before queueing it).
      helper.stdin.write(Buffer.concat([length, entry]));
    },
  };
}
