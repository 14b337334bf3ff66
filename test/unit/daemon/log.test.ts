// vmkeepd's logger writes the lines pino wrote: readers (journald filters, the tests, the
// benchmarks) parse them unchanged.
import { describe, expect, it } from 'vitest';
import { createLogger } from '../../../daemon/index.js';

function capture(level: Parameters<typeof createLogger>[0]['level']) {
  const lines: Array<Record<string, unknown>> = [];
  const logger = createLogger({ name: 'vmkeepd', level, write: (line) => {
    expect(line.endsWith('\n')).toBe(true);
    expect(line.slice(0, -1)).not.toContain('\n');
    lines.push(JSON.parse(line) as Record<string, unknown>);
  } });
  return { logger, lines };
}

describe('createLogger', () => {
  it('writes one JSON object per line with pino\'s fields and level numbers', () => {
    const { logger, lines } = capture('info');
    logger.info({ vms: 2, states: { running: 2 } }, 'reattached 2 VM(s)');
    logger.warn('plain message');
    expect(lines[0]).toMatchObject({ level: 30, pid: process.pid, name: 'vmkeepd', vms: 2, states: { running: 2 }, msg: 'reattached 2 VM(s)' });
    expect(typeof lines[0]!['time']).toBe('number');
    expect(typeof lines[0]!['hostname']).toBe('string');
    expect(lines[1]).toMatchObject({ level: 40, msg: 'plain message' });
  });

  it('drops lines below its level', () => {
    const { logger, lines } = capture('warn');
    logger.debug({ a: 1 }, 'no');
    logger.info('no');
    logger.error({ a: 1 }, 'yes');
    expect(lines.map((l) => l['msg'])).toEqual(['yes']);
  });

  it('serializes errors with type, message, stack, code and cause', () => {
    const { logger, lines } = capture('info');
    const error = Object.assign(new Error('outer', { cause: new TypeError('inner') }), { code: 'E_X' });
    logger.error({ vm: 'a', err: error }, 'failed');
    expect(lines[0]!['err']).toMatchObject({ type: 'Error', message: 'outer', code: 'E_X', cause: { type: 'TypeError', message: 'inner' } });
    expect(String((lines[0]!['err'] as { stack: string }).stack)).toContain('outer');
  });

  it('adds a child\'s bindings to each of its lines', () => {
    const { logger, lines } = capture('info');
    logger.child({ vm: 'web1' }).child({ step: 'x' }).info({ n: 1 }, 'hello');
    expect(lines[0]).toMatchObject({ vm: 'web1', step: 'x', n: 1, msg: 'hello' });
  });
});
