import { describe, expect, it } from 'vitest';
import { DEFAULT_MAX_LINE_BYTES, LineDecoder, QmpError } from '../../../qmp/index.js';

const bytes = (text: string): Buffer => Buffer.from(text, 'utf8');

function expectLineTooLong(fn: () => unknown): QmpError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).code).toBe('LINE_TOO_LONG');
    return err as QmpError;
  }
  throw new Error('expected LINE_TOO_LONG to be thrown');
}

describe('LineDecoder', () => {
  it('returns every complete line of a chunk that holds several', () => {
    const decoder = new LineDecoder();
    expect(decoder.push(bytes('{"a":1}\n{"b":2}\n{"c":3}\n'))).toEqual(['{"a":1}', '{"b":2}', '{"c":3}']);
    expect(decoder.pendingBytes).toBe(0);
  });

  it('buffers a partial line until its newline arrives, across many chunks', () => {
    const decoder = new LineDecoder();
    expect(decoder.push(bytes('{"ret'))).toEqual([]);
    expect(decoder.push(bytes('urn": '))).toEqual([]);
    expect(decoder.pendingBytes).toBe(11);
    expect(decoder.push(bytes('{}}\n{"ev'))).toEqual(['{"return": {}}']);
    expect(decoder.push(bytes('ent":1}\n'))).toEqual(['{"event":1}']);
    expect(decoder.pendingBytes).toBe(0);
  });

  it('strips the \\r of QEMU\'s \\r\\n line ends, also when \\r and \\n arrive apart', () => {
    const decoder = new LineDecoder();
    expect(decoder.push(bytes('one\r\ntwo\r'))).toEqual(['one']);
    expect(decoder.push(bytes('\n'))).toEqual(['two']);
  });

  it('keeps empty lines (the client skips them) and ignores empty chunks', () => {
    const decoder = new LineDecoder();
    expect(decoder.push(Buffer.alloc(0))).toEqual([]);
    expect(decoder.push(bytes('\n\nx\n'))).toEqual(['', '', 'x']);
  });

  it('decodes a multi-byte UTF-8 character split at every possible byte boundary', () => {
    const line = 'desc: caf\u00e9 \u{1F600} \u4e2d';
    const encoded = bytes(`${line}\n`);
    for (let cut = 1; cut < encoded.length; cut++) {
      const decoder = new LineDecoder();
      const first = decoder.push(encoded.subarray(0, cut));
      const second = decoder.push(encoded.subarray(cut));
      expect([...first, ...second]).toEqual([line]);
    }
  });

  it('decodes a line delivered one byte at a time', () => {
    const decoder = new LineDecoder();
    const encoded = bytes('\u{1F600}\u00e9\n');
    const lines: string[] = [];
    for (const byte of encoded) lines.push(...decoder.push(Buffer.from([byte])));
    expect(lines).toEqual(['\u{1F600}\u00e9']);
  });

  it('accepts a line of exactly maxLineBytes and rejects one byte more', () => {
    const decoder = new LineDecoder({ maxLineBytes: 8 });
    expect(decoder.push(bytes('12345678\n'))).toEqual(['12345678']);
    const err = expectLineTooLong(() => decoder.push(bytes('123456789\n')));
    expect(err.message).toMatch(/more than 8 bytes/);
  });

  it('counts the still-incomplete line: fails before any newline, holding at most the limit', () => {
    const decoder = new LineDecoder({ maxLineBytes: 100 });
    for (let i = 0; i < 10; i++) {
      decoder.push(Buffer.alloc(10, 0x61));
      expect(decoder.pendingBytes).toBeLessThanOrEqual(100);
    }
    expectLineTooLong(() => decoder.push(Buffer.alloc(1, 0x61)));
    expect(decoder.pendingBytes).toBe(0);
  });

  it('stays failed after an overflow', () => {
    const decoder = new LineDecoder({ maxLineBytes: 4 });
    expectLineTooLong(() => decoder.push(bytes('too long')));
    expectLineTooLong(() => decoder.push(bytes('ok\n')));
  });

  it('defaults to 1 MiB', () => {
    expect(DEFAULT_MAX_LINE_BYTES).toBe(1024 * 1024);
    const decoder = new LineDecoder();
    expect(decoder.maxLineBytes).toBe(DEFAULT_MAX_LINE_BYTES);
    decoder.push(Buffer.alloc(DEFAULT_MAX_LINE_BYTES, 0x61));
    expectLineTooLong(() => decoder.push(bytes('a')));
  });

  it('rejects a nonsensical limit', () => {
    expect(() => new LineDecoder({ maxLineBytes: 0 })).toThrow(RangeError);
    expect(() => new LineDecoder({ maxLineBytes: 1.5 })).toThrow(RangeError);
  });
});
