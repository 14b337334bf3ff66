import { describe, expect, it } from 'vitest';
import { memoryBackendOf, supportsCprTransfer, validateSpec, withMemoryDefault } from '../../../launcher/index.js';

describe('memory backend default', () => {
  it('cpr-transfer is there from QEMU 10.0 on', () => {
    expect(['7.2.22', '8.2.2', '9.2.0', 'x'].map(supportsCprTransfer)).toEqual([false, false, false, false]);
    expect(['10.0.0', '10.0.2', '11.1.0'].map(supportsCprTransfer)).toEqual([true, true, true]);
  });

  it('a spec without memory gets memfd-shared on a QEMU that can do cpr-transfer, anonymous otherwise; a given one is kept', () => {
    const spec = validateSpec({ name: 'p', kernel: '/k' });
    expect(withMemoryDefault(spec, { version: '10.0.2' }).memory).toEqual({ backend: 'memfd-shared' });
    expect(withMemoryDefault(spec, { version: '7.2.22' }).memory).toEqual({ backend: 'anonymous' });
    const chosen = validateSpec({ name: 'p', kernel: '/k', memory: { backend: 'anonymous' } });
    expect(withMemoryDefault(chosen, { version: '10.0.2' }).memory).toEqual({ backend: 'anonymous' });
  });

  it('a record made before the choice existed is anonymous', () => {
    expect(memoryBackendOf(validateSpec({ name: 'p', kernel: '/k' }))).toBe('anonymous');
  });
});
