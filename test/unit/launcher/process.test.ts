import { describe, expect, it } from 'vitest';
import { isSameProcess, parseProcStat, readExe, readProcessIdentity } from '../../../launcher/index.js';

// Fields 4..52 of a real /proc/PID/stat line; field 22 (start time) is 8836573.
const TAIL = '1 4212 4212 34816 4242 4194560 2231 0 0 0 12 4 0 0 20 0 1 0 8836573 231325696 4823 '
  + '18446744073709551615 94273 94281 140731 0 0 0 0 4096 134234626 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0';

describe('parseProcStat', () => {
  it('reads pid, state and start time', () => {
    expect(parseProcStat(`4242 (qemu-system-x86) S ${TAIL}\n`)).toEqual({ pid: 4242, state: 'S', startTime: '8836573' });
  });

  it.each(['(a) b)', 'a b c', ') ) )', '(', 'x) Z 1 (y'])('copes with the command name %j', (comm) => {
    expect(parseProcStat(`77 (${comm}) Z ${TAIL}`)).toEqual({ pid: 77, state: 'Z', startTime: '8836573' });
  });

  it('rejects a truncated or garbled line', () => {
    expect(() => parseProcStat('77 (x) S 1 2 3')).toThrow(/malformed/);
    expect(() => parseProcStat('')).toThrow(/malformed/);
    expect(() => parseProcStat(`77 x S ${TAIL}`)).toThrow(/malformed/);
  });
});

describe('reading /proc', () => {
  it('identifies this process and not a recycled PID', () => {
    const me = readProcessIdentity(process.pid);
    expect(me?.pid).toBe(process.pid);
    expect(me?.state).toMatch(/^[RS]$/);
    expect(isSameProcess(process.pid, me?.startTime ?? '')).toBe(true);
    expect(isSameProcess(process.pid, String(Number(me?.startTime) + 1))).toBe(false);
  });

  it('returns null for PIDs that cannot exist', () => {
    for (const pid of [0, -1, 2 ** 31, 1.5, Number.NaN]) expect(readProcessIdentity(pid)).toBeNull();
    expect(isSameProcess(2 ** 31, '1')).toBe(false);
    expect(readExe(2 ** 31)).toBeNull();
  });

  it('reads the binary of this process', () => {
    expect(readExe(process.pid)).toEqual(expect.objectContaining({ path: process.execPath, deleted: false }));
  });
});
