import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, realpath, unlink } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { ignoreMissing, isSameProcess, readProcessIdentity } from '../launcher/index.js';
import { DaemonError } from './errors.js';
import { tempFileTarget, writeFileAtomic } from './records.js';

export const PID_FILE_NAME = 'vmkeepd.pid';

/** What `<stateDir>/vmkeepd.pid` holds: who owns the state folder (for messages, never for locking). */
export interface PidFileContent {
  pid: number;
  /** Field 22 of /proc/PID/stat: tells the owner from a process that got its PID later. */
  startTime: string;
  startedAt: string;
}

export interface DaemonLock {
  /** The state folder, resolved (the lock is per real folder, not per spelling). */
  readonly stateDir: string;
  /** The abstract socket name held, starting with NUL. */
  readonly socketName: string;
  readonly pidFile: string;
  /** Gives the lock up and removes the pid file if it is still ours. Idempotent. */
  release(): Promise<void>;
}

/**
 * The lock is a Linux abstract unix socket named after the state folder. The kernel drops
 * the name when the last descriptor closes, i.e. when the process dies in any way (SIGKILL
 * included), so a stale lock cannot exist and nothing has to guess whether an old holder
 * still lives. libuv opens sockets close-on-exec, so QEMUs spawned by the daemon never
 * inherit (and never keep) the lock.
 *
 * Caveat: abstract socket names are scoped to the network namespace. Two daemons in
 * different network namespaces (e.g. a unit with PrivateNetwork=yes, or a container with
 * its own netns sharing the folder) would not see each other's socket. As a second guard,
 * a pid file naming another live process (same PID and start time) also refuses the lock;
 * that covers daemons in the same PID namespace. Keep vmkeepd in the host's namespaces.
 */
function daemonLockName(realStateDir: string): string {
  return `\0vmkeepd:${createHash('sha256').update(realStateDir).digest('hex').slice(0, 24)}`;
}

/**
 * Makes this process the only vmkeepd of `stateDir` (created 0700 if missing), then writes
 * the pid file. Throws LOCKED naming the holder when another daemon has the folder.
 */
export async function acquireDaemonLock(stateDir: string): Promise<DaemonLock> {
  let realDir: string;
  try {
    await mkdir(stateDir, { recursive: true, mode: 0o700 });
    realDir = await realpath(stateDir);
  } catch (err) {
    throw new DaemonError('STATE_IO', `cannot use state folder ${stateDir} (${(err as Error).message}): check that it can be created and read`, { cause: err });
  }
  const me = readProcessIdentity(process.pid);
  if (me === null) throw new DaemonError('INTERNAL', `cannot read /proc/${process.pid}/stat of this process: is /proc mounted?`);
  const pidFile = join(realDir, PID_FILE_NAME);
  const socketName = daemonLockName(realDir);

  let server: Server;
  try {
    server = await listenAbstract(socketName);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'EADDRINUSE') throw await lockedError(stateDir, pidFile);
    throw new DaemonError('INTERNAL', `cannot bind the lock socket of state folder ${stateDir} (${(err as Error).message})`, { cause: err });
  }

  try {
    const previous = await readPidFile(pidFile);
    if (previous !== null && previous.pid !== process.pid && isSameProcess(previous.pid, previous.startTime)) {
      // Bound the socket, yet the recorded owner lives: it holds its socket in another network namespace.
      throw await lockedError(stateDir, pidFile, ' (it runs in another network namespace)');
    }
    await removePidTempFiles(realDir);
    const content: PidFileContent = { pid: process.pid, startTime: me.startTime, startedAt: new Date().toISOString() };
    await writeFileAtomic(pidFile, `${JSON.stringify(content)}\n`, { mode: 0o644 });
  } catch (err) {
    await closeServer(server);
    throw err;
  }

  let released = false;
  return {
    stateDir: realDir,
    socketName,
    pidFile,
    async release() {
      if (released) return;
      released = true;
      // Pid file first: a successor never finds the socket free while our pid file still names us live.
      try {
        const current = await readPidFile(pidFile);
        if (current !== null && current.pid === process.pid && current.startTime === me.startTime) {
          await unlink(pidFile).catch(ignoreMissing);
        }
      } finally {
        await closeServer(server);
      }
    },
  };
}

/** The pid file's content, or null when it is missing or unreadable (it only feeds messages). */
export async function readPidFile(pidFile: string): Promise<PidFileContent | null> {
  try {
    const value: unknown = JSON.parse(await readFile(pidFile, 'utf8'));
    if (typeof value !== 'object' || value === null) return null;
    const { pid, startTime, startedAt } = value as Record<string, unknown>;
    if (typeof pid !== 'number' || !Number.isSafeInteger(pid) || pid <= 0) return null;
    if (typeof startTime !== 'string' || typeof startedAt !== 'string') return null;
    return { pid, startTime, startedAt };
  } catch {
    return null;
  }
}

function listenAbstract(name: string): Promise<Server> {
  return new Promise((resolve, reject) => {
    // Nobody talks over the lock socket: a connection is closed at once.
    const server = createServer((socket) => socket.destroy());
    server.once('error', reject);
    server.listen({ path: name }, () => {
      server.off('error', reject);
      // Accept errors later on do not release the name; they must not crash the daemon.
      server.on('error', () => undefined);
      // The lock alone must not keep a finished process alive.
      server.unref();
      resolve(server);
    });
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
  });
}

async function lockedError(stateDir: string, pidFile: string, where = ''): Promise<DaemonError> {
  const holder = await readPidFile(pidFile);
  const who = holder !== null && isSameProcess(holder.pid, holder.startTime)
    ? `pid ${holder.pid}, running since ${holder.startedAt}${where}`
    : `its pid is not known yet: ${pidFile} does not name a live process`;
  return new DaemonError('LOCKED',
    `another vmkeepd (${who}) already manages state folder ${stateDir}; `
    + 'stop it first (systemctl stop vmkeepd) or give this one another --state-dir');
}

/** Temp files of an interrupted pid file write (the lock is held, so no writer is live). */
async function removePidTempFiles(dir: string): Promise<void> {
  for (const f of await readdir(dir)) {
    if (tempFileTarget(f) === PID_FILE_NAME) await unlink(join(dir, f)).catch(() => undefined);
  }
}
