import { QmpError } from './errors.js';

export const DEFAULT_MAX_LINE_BYTES = 1024 * 1024;

const NEWLINE = 0x0a;

export interface LineDecoderOptions {
  /** Longest line accepted, in bytes, not counting the '\n'. Default 1 MiB. */
  maxLineBytes?: number;
}

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

  constructor(options: LineDecoderOptions = {}) {
    const max = options.maxLineBytes ?? DEFAULT_MAX_LINE_BYTES;
    if (!Number.isSafeInteger(max) || max < 1) {
      throw new RangeError(`maxLineBytes must be a positive integer, got ${String(max)}`);
    }
    this.maxLineBytes = max;
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
      const lineBytes = this.partBytes + (end - start);
      if (lineBytes > this.maxLineBytes) throw this.fail(lineBytes);
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

  private fail(lineBytes: number): QmpError {
    this.reset();
    this.failure = new QmpError(
      'LINE_TOO_LONG',
      `QMP peer sent a line of more than ${this.maxLineBytes} bytes (at least ${lineBytes} so far). ` +
        'QEMU never sends lines that long, so the peer is not a sane QMP monitor; the connection was closed. ' +
        'Check that the socket belongs to the VM\'s QEMU.',
    );
    return this.failure;
  }
}

function stripCarriageReturn(line: string): string {
  return line.endsWith('\r') ? line.slice(0, -1) : line;
}
