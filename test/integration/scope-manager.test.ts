// ScopeManager against a real systemd 252 (a private one, see test/support/systemd-host.ts).
// Operations that pass PIDs run INSIDE its pid namespace through the compiled scope driver.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ScopeError, ScopeManager } from '../../scope-manager/index.js';
import { SystemdHost } from '../support/systemd-host.js';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const DRIVER = join(ROOT, 'dist', 'test', 'support', 'scope-driver.js');

let host: SystemdHost;
let tmp: string;

interface DriverReply {
  ok: boolean;
  result?: any; // JSON from the driver
  error?: { code: string; message: string; dbusName: string | null };
}

// dist/ is built by the integration project's global set-up (test/support/build-once.ts).
beforeAll(async () => {
  host = await SystemdHost.boot({ name: `sm-${process.pid}` });
  tmp = await mkdtemp(join(tmpdir(), 'vmkeep-scope-test-'));
});

afterAll(async () => {
  if (host) {
    await host.shutdown();
    expect(host.leftovers()).toEqual([]);
  }
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

async function driver(cmd: object): Promise<DriverReply> {
  const r = await host.exec(process.execPath, [DRIVER, JSON.stringify(cmd)], { cwd: ROOT, timeoutMs: 90_000 });
  const line = r.stdout.trim().split('\n').pop() ?? '';
  if (r.exitCode !== 0 || !line.startsWith('{')) {
    throw new Error(`scope driver ${JSON.stringify(cmd)} exited ${r.exitCode}:\n${r.stdout}\n${r.stderr}\n${await host.consoleTail()}`);
  }
  return JSON.parse(line) as DriverReply;
}

async function ok(cmd: object): Promise<any> {
  const reply = await driver(cmd);
  if (!reply.ok) throw new Error(`scope driver ${JSON.stringify(cmd)} failed: ${reply.error?.code}: ${reply.error?.message}`);
  return reply.result;
}

/** The cgroup2 path (host view) of a live process known inside as `pid`, or null if it is gone. */
function liveCgroup(insidePid: number): string | null {
  const hostPid = host.hostPidOf(insidePid);
  if (hostPid === null) return null;
  try {
    const stat = readFileSync(`/proc/${hostPid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) return null;
    return readFileSync(`/proc/${hostPid}/cgroup`, 'utf8').split('\n').find((l) => l.startsWith('0::'))?.slice(3) ?? null;
  } catch {
    return null;
  }
}

async function waitUntil(what: string, timeoutMs: number, probe: () => Promise<boolean> | boolean): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('ScopeManager on a real systemd', () => {
  it('puts a child in a scope: /proc shows it, getScope reports it, and it outlives the process that created it', async () => {
    const r = await ok({ op: 'create', name: 'vmkeep-t1.scope' });
    expect(r.created).toEqual({ name: 'vmkeep-t1.scope', slice: 'vmkeep.slice', pids: [r.pid], cgroupPath: '/vmkeep.slice/vmkeep-t1.scope' });
    expect(r.cgroup).toBe('/vmkeep.slice/vmkeep-t1.scope');
    expect(r.scope).toEqual({
      name: 'vmkeep-t1.scope',
      activeState: 'active',
      subState: 'running',
      pids: [r.pid],
      controlGroup: '/vmkeep.slice/vmkeep-t1.scope',
      slice: 'vmkeep.slice',
    });
    // The driver has exited; its child lives on in the scope.
    expect(liveCgroup(r.pid)).toMatch(/\/vmkeep\.slice\/vmkeep-t1\.scope$/);
    expect(await ok({ op: 'get', name: 'vmkeep-t1.scope' })).toMatchObject({ activeState: 'active', pids: [r.pid] });
    expect(await ok({ op: 'scopeOfPid', pid: r.pid })).toBe('vmkeep-t1.scope');
    expect(await ok({ op: 'scopeOfPid', pid: 1 })).toBe('init.scope');

    expect(await ok({ op: 'stop', name: 'vmkeep-t1.scope' })).toEqual({ gone: true });
    await waitUntil(`PID ${r.pid} to end after stopScope`, 5_000, () => liveCgroup(r.pid) === null);
    expect(await ok({ op: 'get', name: 'vmkeep-t1.scope' })).toBeNull();
    expect(await driver({ op: 'stop', name: 'vmkeep-t1.scope' })).toMatchObject({ ok: false, error: { code: 'NO_SUCH_SCOPE', dbusName: 'org.freedesktop.systemd1.NoSuchUnit' } });
  });

  it('lists scopes by prefix and finds none for an unknown PID', async () => {
    await ok({ op: 'create', name: 'vmkeep-la-1.scope' });
    await ok({ op: 'create', name: 'vmkeep-la-2.scope' });
    await ok({ op: 'create', name: 'other-la-3.scope' });
    const listed = (await ok({ op: 'list', prefix: 'vmkeep-la-' })) as Array<{ name: string; activeState: string }>;
    expect(listed.map((s) => [s.name, s.activeState])).toEqual([
      ['vmkeep-la-1.scope', 'active'],
      ['vmkeep-la-2.scope', 'active'],
    ]);
    const all = (await ok({ op: 'list' })) as Array<{ name: string }>;
    expect(all.map((s) => s.name)).toContain('vmkeep-la-1.scope');
    expect(all.map((s) => s.name)).not.toContain('other-la-3.scope');
    expect(await ok({ op: 'scopeOfPid', pid: 4_000_000 })).toBeNull();

    // killScope: the scope empties and systemd collects it.
    await ok({ op: 'kill', name: 'vmkeep-la-1.scope', signal: 'SIGKILL' });
    expect(await ok({ op: 'waitGone', name: 'vmkeep-la-1.scope', timeoutMs: 10_000 })).toBe(true);
    for (const name of ['vmkeep-la-2.scope', 'other-la-3.scope']) expect(await ok({ op: 'stop', name })).toEqual({ gone: true });
    expect(await ok({ op: 'list', prefix: 'vmkeep-la-' })).toEqual([]);
  });

  it('refuses a name that stays taken (SCOPE_EXISTS) and takes it once the old scope is gone', async () => {
    const old = await ok({ op: 'create', name: 'vmkeep-busy.scope' });
    const started = Date.now();
    const refused = await driver({ op: 'create', name: 'vmkeep-busy.scope', existingScopeWaitMs: 300 });
    expect(Date.now() - started).toBeGreaterThanOrEqual(300);
    expect(refused).toMatchObject({ ok: false, error: { code: 'SCOPE_EXISTS' } });
    expect(refused.error?.message).toMatch(/vmkeep-busy\.scope still exists after 300 ms \(active\/running, PIDs \d+\)/);
    // The old scope is untouched.
    expect(await ok({ op: 'get', name: 'vmkeep-busy.scope' })).toMatchObject({ activeState: 'active', pids: [old.pid] });

    const replaced = await ok({ op: 'replace', name: 'vmkeep-busy.scope', oldPid: old.pid, existingScopeWaitMs: 10_000 });
    expect(replaced.before).toMatchObject({ activeState: 'active', pids: [old.pid] });
    expect(replaced.settledBeforeOldDied).toBe(false);
    expect(replaced.after).toMatchObject({ activeState: 'active', pids: [replaced.pid] });
    expect(await ok({ op: 'stop', name: 'vmkeep-busy.scope' })).toEqual({ gone: true });
  });

  it('reports a PID that already exited as NO_SUCH_PID', async () => {
    const reply = await driver({ op: 'createExited', name: 'vmkeep-ghost.scope' });
    expect(reply).toMatchObject({ ok: false, error: { code: 'NO_SUCH_PID' } });
    expect(reply.error?.dbusName).toMatch(/^org\.freedesktop\./);
    expect(await ok({ op: 'get', name: 'vmkeep-ghost.scope' })).toBeNull();
  });

  it('reads scopes from outside the namespaces too, over the bus address', async () => {
    await ok({ op: 'create', name: 'vmkeep-outside.scope' });
    const manager = new ScopeManager({ busAddress: host.busAddress });
    try {
      expect((await manager.listScopes('vmkeep-outside')).map((s) => s.name)).toEqual(['vmkeep-outside.scope']);
      await manager.stopScope('vmkeep-outside.scope');
      expect(await manager.waitScopeGone('vmkeep-outside.scope', 10_000)).toBe(true);
      expect(await manager.getScope('vmkeep-outside.scope')).toBeNull();
    } finally {
      manager.close();
    }
  });

  it('says NO_SYSTEMD, with what to do, when there is no bus or no systemd on it', async () => {
    const absent = await driver({ op: 'list', options: { busAddress: 'unix:path=/run/vmkeep-no-such-dir/bus' } });
    expect(absent).toMatchObject({ ok: false, error: { code: 'NO_SYSTEMD' } });
    expect(absent.error?.message).toMatch(/no systemd on the system bus at unix:path=\/run\/vmkeep-no-such-dir\/bus/);
    expect(absent.error?.message).toMatch(/DBUS_SYSTEM_BUS_ADDRESS/);
    expect(absent.error?.message).toMatch(/--no-scope/);

    // A bus without systemd on it, as in a container that runs only dbus-daemon: with no
    // activation files (ServiceUnknown), or with one that cannot start systemd (Spawn.*).
    const address = `unix:path=${join(tmp, 'bare-bus')}`;
    const bareConfig = join(tmp, 'bare-bus.conf');
    await writeFile(
      bareConfig,
      `<busconfig><type>custom</type><listen>${address}</listen><auth>EXTERNAL</auth>` +
        '<policy context="default"><allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/></policy></busconfig>',
    );
    for (const [args, dbusName] of [
      [[`--config-file=${bareConfig}`], /^org\.freedesktop\.DBus\.Error\.ServiceUnknown$/],
      [['--session', `--address=${address}`], /^org\.freedesktop\.DBus\.Error\.Spawn\./],
    ] as const) {
      const bare: ChildProcess = spawn('dbus-daemon', [...args, '--nofork', '--print-address=1'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      bare.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
      try {
        // It prints its address once it listens.
        await new Promise<void>((resolve, reject) => {
          const timer = setTimeout(() => reject(new Error(`dbus-daemon ${args.join(' ')} did not print its address within 10 s: ${stderr}`)), 10_000);
          bare.stdout!.once('data', () => {
            clearTimeout(timer);
            resolve();
          });
          bare.once('exit', (code) => {
            clearTimeout(timer);
            reject(new Error(`dbus-daemon ${args.join(' ')} exited (${code}): ${stderr}`));
          });
        });
        const manager = new ScopeManager({ busAddress: address });
        const err = await manager.listScopes().catch((e: unknown) => e);
        manager.close();
        expect(err).toBeInstanceOf(ScopeError);
        expect(err).toMatchObject({ code: 'NO_SYSTEMD', dbusName: expect.stringMatching(dbusName) });
        expect((err as ScopeError).message).toMatch(/--no-scope/);
      } finally {
        if (bare.exitCode === null && bare.signalCode === null) {
          bare.kill('SIGTERM');
          await once(bare, 'exit');
        }
      }
    }
  });

  it('survival: a scoped child outlives stop, restart and SIGKILL of its service; an unscoped one (negative control) does not', async () => {
    const outcomes: Record<string, Array<{ action: string; survived: boolean; cgroupBefore: string }>> = {};
    for (const scoped of [true, false]) {
      const unit = scoped ? 'fake-daemon-scoped.service' : 'fake-daemon-unscoped.service';
      const resultFile = join(tmp, `${unit}.json`);
      const cmdFile = join(tmp, `${unit}.cmd.json`);
      await writeFile(cmdFile, JSON.stringify({ op: 'serve', scopePrefix: scoped ? 'vmkeep-survivor-' : null, resultFile }));
      await host.writeUnit(unit, `[Service]\nExecStart=${process.execPath} ${DRIVER} @${cmdFile}\nKillMode=control-group\n`);

      const startAndRead = async (verb: 'start' | 'restart'): Promise<{ driverPid: number; sleepPid: number; scope: string | null; cgroup: string }> => {
        await rm(resultFile, { force: true });
        await host.systemctl(verb, unit);
        await waitUntil(`${unit} to write ${resultFile}`, 30_000, () => readFile(resultFile).then(() => true, () => false));
        const result = JSON.parse(await readFile(resultFile, 'utf8'));
        if (result.error) throw new Error(`${unit}: ${result.error}`);
        expect(result.cgroup).toBe(scoped ? `/vmkeep.slice/${result.scope}` : `/system.slice/${unit}`);
        return result;
      };
      const fate = (action: string, r: { sleepPid: number; cgroup: string }) => ({
        action,
        survived: liveCgroup(r.sleepPid)?.endsWith(r.cgroup) ?? false,
        cgroupBefore: r.cgroup,
      });

      const first = await startAndRead('start');
      const second = await startAndRead('restart');
      const afterRestart = fate('restart', first);
      await host.systemctl('kill', '--signal=SIGKILL', unit);
      await waitUntil(`${unit} to die of SIGKILL`, 10_000, async () => (await host.exec('systemctl', ['is-active', unit])).stdout.trim() !== 'active');
      const afterKill = fate('kill -s KILL', second);
      await host.systemctl('reset-failed', unit);
      const third = await startAndRead('start');
      await host.systemctl('stop', unit);
      const afterStop = fate('stop', third);
      outcomes[scoped ? 'scoped' : 'unscoped'] = [afterRestart, afterKill, afterStop];
    }

    expect(outcomes['scoped']!.map((o) => [o.action, o.survived])).toEqual([
      ['restart', true],
      ['kill -s KILL', true],
      ['stop', true],
    ]);
    expect(outcomes['unscoped']!.map((o) => [o.action, o.survived])).toEqual([
      ['restart', false],
      ['kill -s KILL', false],
      ['stop', false],
    ]);

    const survivors = (await ok({ op: 'list', prefix: 'vmkeep-survivor-' })) as Array<{ name: string }>;
    expect(survivors).toHaveLength(3);
    for (const s of survivors) expect(await ok({ op: 'stop', name: s.name })).toEqual({ gone: true });
  });

  it('stopScope never escalates to SIGKILL: a process that ignores SIGTERM stays, reported in a failed scope', async () => {
    const name = 'vmkeep-stubborn.scope';
    const r = await ok({ op: 'create', name, ignoreSigterm: true, properties: { TimeoutStopUSec: { signature: 't', value: 500_000 } } });
    expect(await ok({ op: 'stop', name, waitGoneMs: 300 })).toEqual({ gone: false });
    expect(await ok({ op: 'get', name })).toMatchObject({ activeState: 'failed', pids: [r.pid] });
    expect(liveCgroup(r.pid)).toMatch(/\/vmkeep\.slice\/vmkeep-stubborn\.scope$/);
    // A hard kill only when asked for explicitly.
    await ok({ op: 'kill', name, signal: 'SIGKILL' });
    expect(await ok({ op: 'waitGone', name, timeoutMs: 10_000 })).toBe(true);
  });

  it('a D-Bus restart fails a pending job wait with BUS_CLOSED, and the next call reconnects', async () => {
    const name = 'vmkeep-slowstop.scope';
    await ok({ op: 'create', name, ignoreSigterm: true, properties: { TimeoutStopUSec: { signature: 't', value: 20_000_000 } } });
    const manager = new ScopeManager({ busAddress: host.busAddress });
    try {
      const stopping = manager.stopScope(name).catch((e: unknown) => e);
      await waitUntil(`${name} to be deactivating`, 10_000, async () => (await host.systemctl('show', '-P', 'ActiveState', name)).trim() === 'deactivating');
      await host.systemctl('restart', 'dbus.service');
      expect(await stopping).toMatchObject({ code: 'BUS_CLOSED' });
      // systemd needs a moment to get back on the new bus: until then the answer is NO_SYSTEMD.
      let scopes: string[] = [];
      await waitUntil('systemd back on the restarted bus', 10_000, async () => {
        const listed = await manager.listScopes('vmkeep-slowstop').catch((e: unknown) => {
          if (e instanceof ScopeError && e.code === 'NO_SYSTEMD') return null;
          throw e;
        });
        scopes = listed?.map((s) => s.name) ?? [];
        return listed !== null;
      });
      expect(scopes).toEqual([name]);
      await manager.killScope(name, 'SIGKILL');
      expect(await manager.waitScopeGone(name, 10_000)).toBe(true);
    } finally {
      manager.close();
    }
  });

  it('measures createScope until active (median over 60)', async () => {
    const bench = await ok({ op: 'bench', count: 60 });
    console.log(`createScope until active: median ${bench.medianMs} ms, p90 ${bench.p90Ms} ms, min ${bench.minMs} ms, max ${bench.maxMs} ms (n=${bench.count})`);
    expect(bench.samplesMs).toHaveLength(60);
    expect(bench.medianMs).toBeLessThan(1_000);
    expect(await ok({ op: 'list', prefix: 'vmkeep-bench-' })).toEqual([]);
  });
});
