// Runs ScopeManager operations from INSIDE a private systemd (PIDs must be those of systemd's
// pid namespace), for test/integration/scope-manager.test.ts. Compiled to
// dist/test/support/scope-driver.js and run with `node scope-driver.js '<json>'` or `@file.json`.
// Prints one JSON line: {"ok":true,"result":...} or {"ok":false,"error":{code,message,dbusName}}.
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync } from 'node:fs';
import { readFile, rename, writeFile } from 'node:fs/promises';
import { ScopeError, ScopeManager, type ScopeManagerOptions, type ScopeProperty } from '../../scope-manager/index.js';
import { benchCreateScope } from './scope-bench.js';

type Command =
  | { op: 'create'; name: string; existingScopeWaitMs?: number; properties?: Record<string, ScopeProperty>; ignoreSigterm?: boolean }
  | { op: 'createExited'; name: string }
  | { op: 'replace'; name: string; oldPid: number; existingScopeWaitMs: number }
  | { op: 'get'; name: string }
  | { op: 'list'; prefix?: string }
  | { op: 'scopeOfPid'; pid: number }
  | { op: 'stop'; name: string; waitGoneMs?: number }
  | { op: 'waitGone'; name: string; timeoutMs: number }
  | { op: 'kill'; name: string; signal: NodeJS.Signals }
  | { op: 'serve'; scopePrefix: string | null; resultFile: string }
  | { op: 'bench'; count: number };

type Options = Pick<ScopeManagerOptions, 'busAddress' | 'callTimeoutMs' | 'existingScopeWaitMs'>;

/**
 * A `sleep infinity` in its own session, so nothing ties it to this process but its cgroup.
 * `ignoreSigterm` plays a QEMU that does not quit on SIGTERM (an ignored signal stays ignored across exec).
 */
function spawnSleeper(ignoreSigterm = false): ChildProcess & { pid: number } {
  const child = ignoreSigterm
    ? spawn('sh', ['-c', 'trap "" TERM; exec sleep infinity'], { stdio: 'ignore', detached: true })
    : spawn('sleep', ['infinity'], { stdio: 'ignore', detached: true });
  if (child.pid === undefined) throw new Error('could not spawn sleep');
  child.unref();
  return child as ChildProcess & { pid: number };
}

async function cgroupOf(pid: number): Promise<string> {
  return (await readFile(`/proc/${pid}/cgroup`, 'utf8')).split('\n').find((l) => l.startsWith('0::'))?.slice(3) ?? '';
}

async function run(manager: ScopeManager, cmd: Command): Promise<unknown> {
  switch (cmd.op) {
    case 'create': {
      const child = spawnSleeper(cmd.ignoreSigterm);
      try {
        const created = await manager.createScope({
          name: cmd.name,
          pids: [child.pid],
          existingScopeWaitMs: cmd.existingScopeWaitMs,
          properties: cmd.properties,
        });
        return { pid: child.pid, created, cgroup: await cgroupOf(child.pid), scope: await manager.getScope(cmd.name) };
      } catch (err) {
        child.kill('SIGKILL');
        throw err;
      }
    }
    case 'createExited': {
      const child = spawn('true', [], { stdio: 'ignore' });
      await once(child, 'exit'); // reaped by node: the PID is gone
      return manager.createScope({ name: cmd.name, pids: [child.pid ?? 0] });
    }
    case 'replace': {
      // Proves createScope waits for the old unit: it is already waiting when the old process dies.
      const child = spawnSleeper();
      let settled = false;
      const creating = manager.createScope({ name: cmd.name, pids: [child.pid], existingScopeWaitMs: cmd.existingScopeWaitMs });
      creating.then(
        () => (settled = true),
        () => (settled = true),
      );
      // Calls on one connection are answered in order: once this answers, createScope has seen the old unit.
      const before = await manager.getScope(cmd.name);
      const settledBeforeOldDied = settled;
      process.kill(cmd.oldPid, 'SIGKILL');
      try {
        const created = await creating;
        return { before, settledBeforeOldDied, created, after: await manager.getScope(cmd.name), pid: child.pid };
      } catch (err) {
        child.kill('SIGKILL');
        throw err;
      }
    }
    case 'get':
      return manager.getScope(cmd.name);
    case 'list':
      return manager.listScopes(cmd.prefix);
    case 'scopeOfPid':
      return manager.scopeOfPid(cmd.pid);
    case 'stop': {
      await manager.stopScope(cmd.name);
      return { gone: await manager.waitScopeGone(cmd.name, cmd.waitGoneMs ?? 10_000) };
    }
    case 'waitGone':
      return manager.waitScopeGone(cmd.name, cmd.timeoutMs);
    case 'kill':
      await manager.killScope(cmd.name, cmd.signal);
      return null;
    case 'serve': {
      // A stand-in for the daemon, run as a service: a child, optionally moved into its own scope.
      const child = spawnSleeper();
      const scope = cmd.scopePrefix === null ? null : `${cmd.scopePrefix}${process.pid}.scope`;
      let result: unknown;
      try {
        if (scope !== null) await manager.createScope({ name: scope, pids: [child.pid] });
        result = { driverPid: process.pid, sleepPid: child.pid, scope, cgroup: await cgroupOf(child.pid) };
      } catch (err) {
        result = { error: String(err) };
      }
      manager.close();
      await writeFile(`${cmd.resultFile}.tmp`, JSON.stringify(result));
      await rename(`${cmd.resultFile}.tmp`, cmd.resultFile);
      setInterval(() => undefined, 1 << 30); // keeps running like a daemon until its service stops
      return result;
    }
    case 'bench':
      return benchCreateScope(manager, { count: cmd.count });
  }
}

async function main(): Promise<void> {
  const arg = process.argv[2];
  if (!arg) throw new Error("usage: scope-driver '<json command>' | @command.json");
  const { options, ...cmd } = JSON.parse(arg.startsWith('@') ? readFileSync(arg.slice(1), 'utf8') : arg) as Command & { options?: Options };
  const manager = new ScopeManager(options);
  try {
    const result = await run(manager, cmd as Command);
    process.stdout.write(`${JSON.stringify({ ok: true, result })}\n`);
  } catch (err) {
    const error =
      err instanceof ScopeError
        ? { code: err.code, message: err.message, dbusName: err.dbusName ?? null }
        : { code: 'UNEXPECTED', message: err instanceof Error ? (err.stack ?? err.message) : String(err), dbusName: null };
    process.stdout.write(`${JSON.stringify({ ok: false, error })}\n`);
  } finally {
    if (cmd.op !== 'serve') manager.close();
  }
}

void main();
