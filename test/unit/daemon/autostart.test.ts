// Autostart at host boot: the pure plan, the bounded runner, and the manager on the fake QEMU
// host through a simulated reboot (every QEMU gone, a new kernel boot ID).
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { bootIdFile, planAutostart, runBounded, type AutostartFacts } from '../../../daemon/autostart.js';
import { openWorld, type World } from './manager-world.js';

const BOOT_A = '11111111-1111-4111-8111-111111111111';
const BOOT_B = '22222222-2222-4222-8222-222222222222';

const vm = (name: string, extra: Partial<AutostartFacts> = {}): AutostartFacts => ({ name, state: 'stopped', hasProcess: false, ...extra });

describe('planAutostart', () => {
  const vms = [
    vm('ls-running', { wanted: 'running' }),
    vm('ls-stopped', { wanted: 'stopped' }),
    vm('ls-unknown'),
    vm('always', { autostart: 'always', wanted: 'stopped' }),
    vm('never', { autostart: 'never', wanted: 'running' }),
    vm('alive', { autostart: 'always', state: 'running', hasProcess: true, wanted: 'running' }),
  ];

  it('a new boot starts always, and last-state VMs that were running; never, stopped and alive ones are left', () => {
    const plan = planAutostart({ currentBootId: BOOT_B, recordedBootId: BOOT_A, vms });
    expect(plan.boot).toBe(true);
    expect(plan.start).toEqual(['always', 'ls-running']);
    expect(Object.fromEntries(plan.skipped.map((s) => [s.name, s.why]))).toEqual({
      alive: 'it has a QEMU already (running)',
      'ls-stopped': 'autostart=last-state and it was stopped before the host went down',
      'ls-unknown': 'autostart=last-state and it was not running',
      never: 'autostart=never',
    });
  });

  it('the same boot (a daemon restart) starts nothing, and neither does a first start with no boot ID recorded', () => {
    expect(planAutostart({ currentBootId: BOOT_A, recordedBootId: BOOT_A, vms })).toEqual({ boot: false, start: [], skipped: [] });
    expect(planAutostart({ currentBootId: BOOT_A, recordedBootId: undefined, vms })).toEqual({ boot: false, start: [], skipped: [] });
  });
});

describe('runBounded', () => {
  it('runs at most `parallel` at once, and a failure does not stop the others', async () => {
    let running = 0;
    let most = 0;
    const results: Array<[string, string | undefined]> = [];
    await runBounded(['a', 'b', 'c', 'd', 'e'], { parallel: 2, delayMs: 0 }, async (name) => {
      running++;
      most = Math.max(most, running);
      await new Promise((resolve) => setTimeout(resolve, 5));
      running--;
      if (name === 'b') throw new Error('no kernel');
    }, (name, error) => results.push([name, error?.message]));
    expect(most).toBe(2);
    expect(results.sort()).toEqual([['a', undefined], ['b', 'no kernel'], ['c', undefined], ['d', undefined], ['e', undefined]]);
  });

  it('spaces the launches by the delay', async () => {
    const at: number[] = [];
    const began = Date.now();
    await runBounded(['a', 'b', 'c'], { parallel: 3, delayMs: 40 }, async () => void at.push(Date.now() - began), () => undefined);
    expect(at.length).toBe(3);
    // Timers may fire a little early or late; the spacing is what counts.
    expect(at[2]! - at[0]!).toBeGreaterThanOrEqual(70);
  });
});

describe('the manager through a host reboot', () => {
  let world: World | undefined;
  afterEach(async () => {
    await world?.close();
    world = undefined;
  });

  it('last-state and always VMs run again, never and operator-stopped ones do not; a restart within the boot starts nothing', async () => {
    const w = (world = await openWorld());
    const stateDir = w.manager.info().stateDir;
    await mkdir(stateDir, { recursive: true });
    const kernelBootId = join(stateDir, '..', 'kernel-boot-id');
    await writeFile(kernelBootId, `${BOOT_A}\n`);
    const boot = async () => w.manager.autostartAtBoot({ stateDir, parallel: 2, delayMs: 0, kernelBootId });

    for (const name of ['web', 'db', 'al', 'nv', 'op']) await w.manager.create(w.spec(name));
    await w.manager.set('al', { autostart: 'always' });
    await w.manager.set('nv', { autostart: 'never' });
    // First start of this daemon version: the boot ID is only recorded.
    expect((await boot()).boot).toBe(false);
    expect((await readFile(bootIdFile(stateDir), 'utf8')).trim()).toBe(BOOT_A);

    // The operator stops al and op; the host's shutdown powers off web and nv; db's QEMU is
    // still there when the host goes down (it ignored ACPI, or the guests unit was not active).
    await w.manager.stop('al', { timeoutSec: 5 });
    await w.manager.stop('op', { timeoutSec: 5 });
    await w.manager.stop('web', { timeoutSec: 5, hostShutdown: true });
    await w.manager.stop('nv', { timeoutSec: 5, hostShutdown: true });
    // A daemon restart within the boot starts nothing.
    await w.restart();
    expect((await boot()).start).toEqual([]);
    expect((await w.manager.list()).map((v) => [v.name, v.state])).toEqual([['al', 'stopped'], ['db', 'running'], ['nv', 'stopped'], ['op', 'stopped'], ['web', 'stopped']]);

    // The reboot: every QEMU gone, a new boot ID.
    for (const q of w.host.qemus.values()) q.die();
    await writeFile(kernelBootId, `${BOOT_B}\n`);
    await w.restart();
    const plan = await boot();
    expect(plan).toMatchObject({ boot: true, start: ['al', 'db', 'web'] });
    const states = Object.fromEntries((await w.manager.list()).map((v) => [v.name, v.state]));
    expect(states).toEqual({ al: 'running', db: 'running', web: 'running', nv: 'stopped', op: 'stopped' });
    expect((await readFile(bootIdFile(stateDir), 'utf8')).trim()).toBe(BOOT_B);

    // And a restart after that boot starts nothing again, even for a VM the operator stopped.
    await w.manager.stop('web', { timeoutSec: 5 });
    await w.restart();
    expect((await boot()).boot).toBe(false);
    expect((await w.manager.get('web')).state).toBe('stopped');
  });

  it("a VM running at the host's shutdown counts as running even if its record predates `wanted`", async () => {
    const w = (world = await openWorld());
    await w.manager.create(w.spec('old'));
    const entry = w.manager.entries()[0]!;
    const { wanted: _dropped, ...before } = entry.record;
    entry.record = before;
    await w.manager.stop('old', { timeoutSec: 5, hostShutdown: true });
    expect(w.manager.entries()[0]?.record.wanted).toBe('running');
  });

  it('a VM whose start fails at boot is reported with the reason, and the others start', async () => {
    const w = (world = await openWorld());
    const stateDir = w.manager.info().stateDir;
    await mkdir(stateDir, { recursive: true });
    const kernelBootId = join(stateDir, '..', 'kernel-boot-id');
    await writeFile(kernelBootId, `${BOOT_A}\n`);
    await writeFile(bootIdFile(stateDir), `${BOOT_A}\n`);
    for (const name of ['web', 'db']) {
      await w.manager.create(w.spec(name));
      await w.manager.stop(name, { timeoutSec: 5, hostShutdown: true });
    }
    await writeFile(kernelBootId, `${BOOT_B}\n`);
    await w.restart();
    w.host.failLaunches = 1;
    await w.manager.autostartAtBoot({ stateDir, parallel: 1, delayMs: 0, kernelBootId });
    const views = await w.manager.list();
    expect(views.map((v) => v.state)).toEqual(['exited', 'running']);
    expect(views[0]?.problem).toMatch(/Cannot allocate memory/);
  });
});
