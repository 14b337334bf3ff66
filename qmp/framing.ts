import { QmpError } from './errors.js';

export const DEFAULT_MAX_LINE_BYTES = 1024 * 1024;

const NEWLINE = 0x0a;

export interface LineDecoderOptions {
  /** Longest line accepted, in bytes, not counting the '\n'. Default 1 MiB. */
  maxLineBytes?: number;
  /**
   * Asked when a line grows past the limit: true skips that line up to its '\n' and reports
   * it as an `OVERSIZED_LINE` marker in the returned lines (a huge but legitimate reply, e.g.
   * a human-monitor-command dump) instead of failing for good. Bytes skipped are bounded by
   * `maxSkipBytes`; past that the decoder fails as when this says false.
   */
  skipOversized?: () => boolean;
  /** Default 64 x maxLineBytes. */
  maxSkipBytes?: number;
}

/** Stands in `push()`'s result for a line that was too long and was skipped. */
export const OVERSIZED_LINE = '\u0000oversized';

/**
 * Splits a byte stream into '\n'-terminated lines. Pure: no I/O, no timers.
 *
 * Bytes are kept as bytes until a line is complete, so a multi-byte UTF-8 character split
 * across chunks decodes correctly. The incomplete line counts against the limit too, so a
 * peer that never sends '\n' cannot make it grow without bound: held memory stays below
 * maxLineBytes. After an overflow the decoder stays failed and keeps throwing.
 */
export class LineDecoder {
  readonly maxLineBytes: number;
  private parts: Buffer[] = [];
  private partBytes = 0;
  private failure: QmpError | undefined;
  private readonly skipOversized: () => boolean;
  private readonly maxSkipBytes: number;
  /** Bytes of an overlong line discarded so far; -1 when not skipping. */
  private skipped = -1;

  constructor(options: LineDecoderOptions = {}) {
    const max = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!Number.isSafeInteger(max) || max < 1) {
      throw new RangeError(`maxLineBytes must be a positive integer, got ${String(max)}`);
    }
    this.maxLineBytes = max;
    this.skipOversized = options.skipOversized ?? (() => false);
    this.maxSkipBytes = options.maxSkipBytes ?? 64 * max;
  }

  /** Bytes of the incomplete line held so far. */
  get pendingBytes(): number {
    return this.partBytes;
  }

  /**
   * Feeds a chunk; returns the lines it completed (without '\n' or a trailing '\r').
   * Throws QmpError 'LINE_TOO_LONG' as soon as a line exceeds the limit.
   */
  push(chunk: Buffer): string[] {
    if (this.failure) throw this.failure;
    const lines: string[] = [];
    let start = 0;
    while (start < chunk.length) {
      const newline = chunk.indexOf(NEWLINE, start);
      const end = newline === -1 ? chunk.length : newline;
      if (this.skipped >= 0) {
        this.skipped += end - start;
        if (this.skipped > this.maxSkipBytes) throw this.fail(this.skipped + this.maxLineBytes);
        if (newline === -1) break;
        this.skipped = -1;
        lines.push(OVERSIZED_LINE);
        start = newline + 1;
        continue;
      }
      const lineBytes = this.partBytes + (end - start);
      if (lineBytes > this.maxLineBytes) {
        if (!this.skipOversized()) throw this.fail(lineBytes);
        this.reset();
        this.skipped = lineBytes - (end - start);
        continue;
      }
      if (newline === -1) {
        // Copy: a subarray would pin the whole (possibly much larger) chunk in memory.
        this.parts.push(Buffer.from(chunk.subarray(start)));
        this.partBytes = lineBytes;
        break;
      }
      const tail = chunk.subarray(start, newline);
      const bytes = this.parts.length === 0 ? tail : Buffer.concat([...this.parts, tail], lineBytes);
      this.parts = [];
      this.partBytes = 0;
      lines.push(stripCarriageReturn(bytes.toString('utf8')));
      start = newline + 1;
    }
    return lines;
  }

  /** Drops the incomplete line (frees its memory), e.g. when the connection is gone. */
  reset(): void {
    this.parts = [];
    this.partBytes = 0;
  }

  /** Whether an overlong line is being skipped (its '\n' not seen yet). */
  get skipping(): boolean {
    return this.skipped >= 0;
  }

  private fail(lineBytes: number): QmpError {
    this.reset();
    this.failure = new QmpError(
      'LINE_TOO_LONG',
      `QMP peer sent a line of more than ${this.maxLineBytes} bytes (at least ${lineBytes} so far) where no reply ` +
        'was expected or past any sane size; the connection was closed. Check that the socket belongs to the VM\'s QEMU.',
    );
    return this.failure;
  }
}

function stripCarriageReturn(line: string): string {
  return line.endsWith('\r') ? line.slice(0, -1) : line;
}
