import { describe, expect, it } from 'vitest';
import { compareQemuVersions, UpgradeError } from '../../../upgrade/index.js';

describe('compareQemuVersions', () => {
  it('orders a plain version against one with a distro suffix', () => {
    expect(compareQemuVersions('7.2.22', '8.2.2 (Debian 1:8.2.2+ds)')).toBe(-1);
    expect(compareQemuVersions('8.2.2 (Debian 1:8.2.2+ds)', '7.2.22')).toBe(1);
  });

  it('compares numerically, not as text', () => {
    expect(compareQemuVersions('7.2.9', '7.2.22')).toBe(-1);
    expect(compareQemuVersions('10.0.0', '9.2.0')).toBe(1);
  });

  it('treats equal versions as equal, whatever the suffix', () => {
    expect(compareQemuVersions('8.2.2', '8.2.2')).toBe(0);
    expect(compareQemuVersions('8.2.2', '8.2.2 (Debian 1:8.2.2+ds)')).toBe(0);
    expect(compareQemuVersions('7.2', '7.2.0')).toBe(0);
  });

  it('refuses a string with no version in it with BAD_VERSION, quoting it', () => {
    for (const [a, b] of [['garbage', '8.2.2'], ['8.2.2', ''], ['8.2.2', 'vX.Y']]) {
      let caught: unknown;
      try {
        compareQemuVersions(a as string, b as string);
      } catch (err) {
        caught = err;
      }
      expect(caught).toBeInstanceOf(UpgradeError);
      expect((caught as UpgradeError).code).toBe('BAD_VERSION');
      const bad = a === '8.2.2' ? b : a;
      expect((caught as UpgradeError).message).toContain(JSON.stringify(bad));
    }
  });
});
