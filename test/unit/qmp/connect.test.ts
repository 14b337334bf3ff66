import { describe, expect, it } from 'vitest';
import { connectQmp, QmpError } from '../../../qmp/index.js';

// Only failures decided before any socket is opened; real sockets are covered by
// test/integration/qmp-hostile.test.ts.
describe('connectQmp argument checks', () => {
  it('refuses a socket path too long for a unix socket instead of letting it be truncated', async () => {
    const path = `/tmp/${'d'.repeat(120)}/qmp.sock`;
    const err = await connectQmp(path).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(QmpError);
    expect((err as QmpError).code).toBe('CONNECT_FAILED');
    expect((err as QmpError).message).toContain(path);
    expect((err as QmpError).message).toMatch(/at most 107/);
  });

  it('refuses a nonsensical connect timeout', async () => {
    const err = await connectQmp('/tmp/x.sock', { connectTimeoutMs: Number.NaN }).catch((e: unknown) => e);
    expect((err as QmpError).code).toBe('INVALID_ARGUMENT');
  });
});
