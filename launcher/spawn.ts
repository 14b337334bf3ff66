import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, existsSync, fstatSync } from 'node:fs';
import { open, unlink } from 'node:fs/promises';
import { connect } from 'node:net';
import type { QemuCommand } from './argv.js';
import { qemuEnvironment } from './env.js';
import { LaunchError } from './errors.js';
import { closeFds, openInheritedFds, stdioWithInherited } from './inherited-fds.js';
import { readProcessIdentity } from './process.js';
import { openOwnFile } from './safe-files.js';
import { descriptorWithinRoots } from './storage-roots.js';

/** The unprivileged user QEMU runs as (ARCHITECTURE.md, invariant 11): uid and primary gid from its passwd entry. */
export interface QemuUser {
  name: string;
  uid: number;
  gid: number;
}

/**
 * The program and arguments that start `command` as `user`: setpriv (util-linux) switches uid
 * and gid and takes the user's own supplementary groups (kvm for /dev/kvm) before exec, so QEMU
 * starts unprivileged and never calls setuid itself (its sandbox's elevateprivileges=deny would
 * kill it for that). Node's spawn uid/gid would clear the groups (no kvm). Pure.
 */
export function commandAs(command: Pick<QemuCommand, 'binary' | 'argv'>, user: QemuUser | undefined): { file: string; args: string[] } {
  if (user === undefined || user.uid === 0) return { file: command.binary, args: command.argv };
  return { file: 'setpriv', args: ['--reuid', String(user.uid), '--regid', String(user.gid), '--init-groups', '--', command.binary, ...command.argv] };
}

export interface SpawnOptions {
  /** Run QEMU as this user (absent: as vmkeepd's own user, as `vmkeep run` does). */
  runAs?: QemuUser;
  /** QEMU's stdout and stderr are appended here: the only record of why a start failed. */
  stderrLog: string;
  /**
   * QEMU's QMP socket (the path in `-qmp unix:PATH`). The start succeeds once QEMU answers
   * a command on it, which it does only after its whole initialisation (kernel loaded,
   * disks opened); if QEMU exits first, the start fails with QEMU_EXITED. The path must not
   * exist beforehand. Without it, the start succeeds as soon as the process runs and early
   * exits go unnoticed.
   */
  readyPath?: string;
  /**
   * Moves the new QEMU into its own scope. Requires `-S` in the command: QEMU must not run
   * guest code in the caller's cgroup.
   */
  placeInScope?: (pid: number) => Promise<void>;
  /** How long QEMU gets to answer on readyPath (default 15 s). */
  spawnTimeoutMs?: number;
  /**
   * `answers` (default): readyPath is the QMP socket and must answer a command. `listening`:
   * readyPath is a socket QEMU listens on that must not be connected to here (a cpr-transfer
   * destination's cpr channel: it has no monitor until its source connects there); it is
   * ready once the socket exists.
   */
  readyWhen?: 'answers' | 'listening';
  /** Every passed file must be inside one of these real paths, judged on its open descriptor. */
  storageRoots?: readonly string[];
}

export interface SpawnedQemu {
  pid: number;
  /** Field 22 of /proc/PID/stat, recorded with the PID to recognise this process later. */
  startTime: string;
}

const DEFAULT_SPAWN_TIMEOUT_MS = 15_000;
const READY_POLL_MS = 10;
const REAP_TIMEOUT_MS = 5_000;
const STDERR_TAIL_LINES = 20;

interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/**
 * Starts QEMU detached from us: its own session (setsid), no pipes to this process, so the
 * daemon can exit, crash or restart without QEMU noticing.
 */
export async function spawnQemu(command: QemuCommand, options: SpawnOptions): Promise<SpawnedQemu> {
  // A migration destination waiting with `-incoming defer` runs no guest code until it is told
  // where to listen (after placement) and a stream completes; any other -incoming listens at once.
  // A cpr-transfer destination runs no guest code either before its stream, which the source
  // sends only when told to, after placement.
  const deferred = command.argv.some((arg, i) => arg === '-incoming' && (command.argv[i + 1] === 'defer' || isCprChannelArg(command.argv[i + 1])));
  if (options.placeInScope !== undefined && !command.argv.includes('-S') && !deferred) {
    throw new LaunchError('SPAWN_FAILED',
      'refusing to start QEMU without -S when it must be moved into a scope: it would run guest code in the daemon\'s cgroup; fix: build the command with startPaused: true (or as a migration destination with incoming: \'defer\')');
  }
  if (options.readyPath !== undefined && existsSync(options.readyPath)) {
    throw new LaunchError('SPAWN_FAILED',
      `${options.readyPath} already exists, so QEMU's start could not be told apart from a leftover; ` +
      'fix: make sure no QEMU of this VM is running, then remove the stale socket');
  }

  // Opened here, by the daemon, so QEMU never opens those paths itself; each is closed on our
  // side once the child has its copy (ARCHITECTURE.md, "Disks and passed descriptors").
  const inherited = openInheritedFds(command.inheritedFds ?? []);
  if (options.storageRoots !== undefined) refuseOutsideRoots(command, inherited, options.storageRoots);
  let logFd: number;
  try {
    logFd = openOwnFile(options.stderrLog, 'append', 0o640);
  } catch (err) {
    closeFds(inherited);
    if (err instanceof LaunchError) throw err;
    throw new LaunchError('SPAWN_FAILED', `cannot open QEMU's log ${options.stderrLog}: ${String(err)}; fix: check that its folder exists and is writable`, { cause: err });
  }
  // Only what this start writes is quoted in an error, not older runs' output in the same log.
  const logStart = fstatSync(logFd).size;
  let child: ChildProcess;
  try {
    const { file, args } = commandAs(command, options.runAs);
    child = spawn(file, args, {
      detached: true,
      stdio: stdioWithInherited(['ignore', logFd, logFd], command.inheritedFds ?? [], inherited),
      env: qemuEnvironment(command.env),
    });
  } catch (err) {
    throw new LaunchError('SPAWN_FAILED', `cannot start ${command.binary}: ${String(err)}`, { cause: err });
  } finally {
    // The child has its own copies of the descriptors.
    closeSync(logFd);
    closeFds(inherited);
  }

  let spawnError: Error | undefined;
  const failedToSpawn = new Promise<Error>((resolve) => child.once('error', (err) => { spawnError ??= err; resolve(err); }));
  let exit: Exit | undefined;
  const exited = new Promise<Exit>((resolve) => child.once('exit', (code, signal) => { exit = { code, signal }; resolve(exit); }));

  const pid = child.pid;
  if (pid === undefined) {
    const err = await failedToSpawn;
    throw new LaunchError('SPAWN_FAILED', `cannot start ${command.binary}: ${err.message}; fix: check the installation's binary path`, { cause: err });
  }
  // Read now, while the child cannot have been reaped yet (at worst it is a zombie).
  const identity = readProcessIdentity(pid);
  if (identity === null) {
    throw new LaunchError('SPAWN_FAILED', `QEMU (PID ${pid}) vanished right after it was started`);
  }

  const describeExit = async (e: Exit): Promise<LaunchError> => {
    const how = e.signal !== null ? `was killed by ${e.signal}` : `exited with code ${String(e.code)}`;
    const stderr = await readLogTail(options.stderrLog, logStart);
    return new LaunchError('QEMU_EXITED',
      `QEMU (${command.binary}) ${how} during start-up: ${stderr === '' ? '(it wrote nothing to stderr)' : `\n${stderr}\n`}` +
      `(log: ${options.stderrLog}); fix: correct what QEMU complains about in the spec or installation`);
  };
  // Ends the QEMU this call started (if still running), reaps it, and removes the socket it
  // left behind, so a corrected retry can use the same paths.
  const abandon = async (): Promise<void> => {
    if (exit === undefined) {
      child.kill('SIGKILL');
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([exited, new Promise((resolve) => { timer = setTimeout(resolve, REAP_TIMEOUT_MS); })]);
      clearTimeout(timer);
    }
    if (exit !== undefined && options.readyPath !== undefined) await unlink(options.readyPath).catch(() => undefined);
  };

  const timeoutMs = options.spawnTimeoutMs ?? DEFAULT_SPAWN_TIMEOUT_MS;
  const outcome = await waitForReady(options.readyPath, options.readyWhen ?? 'answers', exited, failedToSpawn, timeoutMs);
  if (outcome === 'exited' && exit !== undefined) {
    await abandon();
    throw await describeExit(exit);
  }
  if (outcome === 'error') {
    await abandon();
    throw new LaunchError('SPAWN_FAILED', `QEMU (PID ${pid}) failed: ${spawnError?.message ?? 'unknown error'}`, { cause: spawnError });
  }
  if (outcome === 'timeout') {
    await abandon();
    const stderr = await readLogTail(options.stderrLog, logStart);
    throw new LaunchError('TIMEOUT',
      `QEMU (PID ${pid}) did not answer on ${String(options.readyPath)} within ${timeoutMs} ms and was killed` +
      `${stderr === '' ? '' : `; its stderr:\n${stderr}`}\n(log: ${options.stderrLog}); fix: check the log, or allow a longer spawnTimeoutMs on a slow host`);
  }

  if (options.placeInScope !== undefined) {
    let scopeError: unknown;
    try {
      await options.placeInScope(pid);
    } catch (err) {
      scopeError = err ?? new Error('placeInScope failed');
    }
    if (exit !== undefined) {
      await abandon();
      throw await describeExit(exit);
    }
    if (scopeError !== undefined) {
      // Paused with -S, this QEMU never ran guest code: a hard kill loses nothing.
      await abandon();
      const reason = scopeError instanceof Error ? scopeError.message : String(scopeError);
      throw new LaunchError('SCOPE_FAILED',
        `placing QEMU (PID ${pid}) into its scope failed: ${reason}; the paused QEMU was stopped before running guest code. ` +
        'fix: check that systemd is reachable and the scope name is free, then start again', { cause: scopeError });
    }
  }

  child.unref();
  return { pid, startTime: identity.startTime };
}

/** An -incoming argument naming a cpr channel (JSON form). */
function isCprChannelArg(arg: string | undefined): boolean {
  if (arg === undefined || !arg.startsWith('{')) return false;
  try {
    return (JSON.parse(arg) as { 'channel-type'?: unknown })['channel-type'] === 'cpr';
  } catch {
    return false;
  }
}

async function waitForReady(
  readyPath: string | undefined, readyWhen: 'answers' | 'listening', exited: Promise<Exit>, failed: Promise<Error>, timeoutMs: number,
): Promise<'ready' | 'exited' | 'error' | 'timeout'> {
  const cancel = { done: false };
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'timeout'>((resolve) => { timer = setTimeout(() => resolve('timeout'), timeoutMs); });
  const ready = readyPath === undefined
    ? Promise.resolve('ready' as const)
    : readyWhen === 'listening' ? waitForPath(readyPath, cancel) : waitForMainLoop(readyPath, cancel);
  try {
    return await Promise.race([
      exited.then(() => 'exited' as const),
      failed.then(() => 'error' as const),
      ready,
      timeout,
    ]);
  } finally {
    cancel.done = true;
    clearTimeout(timer);
  }
}

/**
 * Resolves once QEMU answers a command on its QMP socket at `path`. QEMU binds the socket
 * and greets from its monitor thread early, before it loads the kernel or opens disks; it
 * runs commands only from its main loop, which starts after the whole initialisation
 * succeeded. So the first reply, not the socket or the greeting, means "started".
 * Polling for the path is waiting on the file itself.
 */
async function waitForMainLoop(path: string, cancel: { done: boolean }): Promise<'ready'> {
  while (!cancel.done) {
    if (existsSync(path) && (await answersCommand(path, cancel))) return 'ready';
    await delay(READY_POLL_MS);
  }
  // Cancelled: the race was decided by another outcome, which ignores this value.
  return 'ready';
}

const MAX_READY_BYTES = 64 * 1024;

/** Resolves once `path` exists (a socket QEMU bound), without connecting to it. */
async function waitForPath(path: string, cancel: { done: boolean }): Promise<'ready'> {
  while (!cancel.done && !existsSync(path)) await delay(READY_POLL_MS);
  return 'ready';
}

/** One minimal monitor session: greeting, qmp_capabilities, any reply; then disconnect. */
function answersCommand(path: string, cancel: { done: boolean }): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect(path);
    let buffered = '';
    let greeted = false;
    const finish = (answered: boolean): void => {
      clearInterval(watchdog);
      socket.destroy();
      resolve(answered);
    };
    // The race in waitForReady may be decided elsewhere (QEMU exited, timeout): stop then.
    const watchdog = setInterval(() => { if (cancel.done) finish(false); }, READY_POLL_MS);
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      buffered += chunk;
      if (buffered.length > MAX_READY_BYTES) return finish(false);
      let newline: number;
      while ((newline = buffered.indexOf('\n')) >= 0) {
        const line = buffered.slice(0, newline);
        buffered = buffered.slice(newline + 1);
        let message: Record<string, unknown>;
        try {
          message = JSON.parse(line) as Record<string, unknown>;
        } catch {
          return finish(false);
        }
        if (!greeted && 'QMP' in message) {
          greeted = true;
          socket.write('{"execute":"qmp_capabilities"}\n');
        } else if (greeted && ('return' in message || 'error' in message)) {
          return finish(true);
        }
      }
    });
    socket.once('error', () => finish(false));
    socket.once('close', () => finish(false));
  });
}

/** The last lines QEMU wrote to the log since `start` (a byte offset). */
async function readLogTail(path: string, start: number): Promise<string> {
  try {
    const handle = await open(path, 'r');
    try {
      const { size } = await handle.stat();
      const length = Math.max(0, Math.min(size - start, 64 * 1024));
      const buffer = Buffer.alloc(length);
      await handle.read(buffer, 0, length, size - length);
      return buffer.toString('utf8').trimEnd().split('\n').slice(-STDERR_TAIL_LINES).join('\n');
    } finally {
      await handle.close();
    }
  } catch {
    return '';
  }
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Closes everything and refuses when a passed file is not in the storage roots (by its descriptor). */
function refuseOutsideRoots(command: QemuCommand, opened: readonly number[], roots: readonly string[]): void {
  (command.inheritedFds ?? []).forEach(({ source }, i) => {
    if (source.kind !== 'file') return;
    const { inside, path } = descriptorWithinRoots(opened[i] as number, roots);
    if (!inside) {
      closeFds(opened);
      throw new LaunchError('OUTSIDE_STORAGE_ROOTS',
        `rule storage-root: ${source.what} ${source.path} is ${path}, outside the storage roots (${roots.join(', ')}); ` +
        'fix: keep every image of the VM, backing files included, inside a storage root');
    }
  });
}
