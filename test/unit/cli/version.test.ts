// vmkeep --version / vmkeepd --version / vmkeep version, in-process.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { versionRequest } from '../../../cli/version-command.js';
import { projectRoot } from '../../support/paths.js';
import { useCliHarness } from './harness.js';

const cli = useCliHarness('vmkeep-version-');
const PACKAGE_VERSION = (JSON.parse(readFileSync(join(projectRoot(), 'package.json'), 'utf8')) as { version: string }).version;

describe('versionRequest', () => {
  it('turns every spelling into the version command, keeping the other flags', () => {
    expect(versionRequest(['--version'])).toEqual(['version']);
    expect(versionRequest(['-V', '--json'])).toEqual(['version', '--json']);
    expect(versionRequest(['version', '--json'])).toEqual(['version', '--json']);
    // vmkeepd runs main(['daemon', ...argv])
    expect(versionRequest(['daemon', '--version', '--json'])).toEqual(['version', '--json']);
    expect(versionRequest(['list'])).toBeUndefined();
    expect(versionRequest(['daemon', '--state-dir', '/x'])).toBeUndefined();
  });
});

describe('vmkeep --version', () => {
  it('prints the package version and exits 0', async () => {
    const { code, stdout, stderr } = await cli.vmkeep(['--version'], { socket: false });
    expect(stderr).toBe('');
    expect(code).toBe(0);
    expect(stdout).toBe(`vmkeep ${PACKAGE_VERSION} (Node.js ${process.versions.node})\n`);
  });

  it('--json names the QEMU installations it sees, and says why one cannot be read', async () => {
    const { code, stdout } = await cli.vmkeep(['--version', '--json', '--qemu', '/nonexistent/qemu', '--cache-dir', cli.dir], { socket: false });
    expect(code).toBe(0);
    const report = JSON.parse(stdout) as Record<string, any>;
    expect(report).toMatchObject({ version: PACKAGE_VERSION, node: process.versions.node });
    expect(report.installations).toEqual([
      expect.objectContaining({ name: 'default', binary: '/nonexistent/qemu', current: ['default'], error: expect.stringMatching(/cannot be read/) }),
    ]);
  });

  it('vmkeepd --version --json: the daemon\'s spelling answers the same', async () => {
    const { code, stdout } = await cli.vmkeep(['daemon', '--version', '--json', '--qemu', '/nonexistent/qemu'], { socket: false });
    expect(code).toBe(0);
    expect(JSON.parse(stdout)).toMatchObject({ version: PACKAGE_VERSION });
  });
});
