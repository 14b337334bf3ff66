// The listening sockets systemd passes to a socket-activated service (vmkeepd.socket), read the
// way sd_listen_fds(3) does: LISTEN_PID must name this process, LISTEN_FDS counts the
// descriptors from 3 on, LISTEN_FDNAMES names them (FileDescriptorName=). With the socket held
// by systemd, a restarting or crashed vmkeepd never refuses a connection: it waits in the queue.
import { DaemonError } from './errors.js';

/** The first passed descriptor (SD_LISTEN_FDS_START). */
const LISTEN_FDS_START = 3;
/** FileDescriptorName= of the control socket in vmkeepd.socket. */
export const CONTROL_FD_NAME = 'control';
/** FileDescriptorName= of the operator socket, when a socket unit holds it too. */
export const OPERATOR_FD_NAME = 'operator';

export interface ListenFd {
  fd: number;
  /** From LISTEN_FDNAMES; "unknown" when systemd passed no names (as sd_listen_fds_with_names). */
  name: string;
}

/** The passed descriptors (pure): none unless LISTEN_PID is `pid` and LISTEN_FDS is a count. */
export function listenFdsFromEnv(env: NodeJS.ProcessEnv, pid: number): ListenFd[] {
  if (env.LISTEN_PID === undefined || env.LISTEN_FDS === undefined) return [];
  // Meant for another process (e.g. inherited through a wrapper that forked): not ours.
  if (!/^\d+$/.test(env.LISTEN_PID) || Number(env.LISTEN_PID) !== pid) return [];
  if (!/^\d+$/.test(env.LISTEN_FDS)) return [];
  const count = Number(env.LISTEN_FDS);
  const names = env.LISTEN_FDNAMES === undefined || env.LISTEN_FDNAMES === '' ? [] : env.LISTEN_FDNAMES.split(':');
  return Array.from({ length: count }, (_, i) => ({ fd: LISTEN_FDS_START + i, name: names[i] ?? 'unknown' }));
}

/**
 * The control socket among the passed descriptors: the one named "control", or the only one.
 * undefined when systemd passed none (vmkeepd started by hand, in tests, without systemd).
 */
export function controlSocketFd(fds: readonly ListenFd[]): number | undefined {
  if (fds.length === 0) return undefined;
  const named = fds.find((f) => f.name === CONTROL_FD_NAME);
  if (named !== undefined) return named.fd;
  if (fds.length === 1) return fds[0]?.fd;
  throw new DaemonError('START_FAILED',
    `systemd passed ${fds.length} sockets (${fds.map((f) => f.name).join(', ')}) and none is named "${CONTROL_FD_NAME}"; set FileDescriptorName=${CONTROL_FD_NAME} on the control socket's ListenStream in vmkeepd.socket`);
}

/**
 * Takes the control and operator sockets passed to this process, if any, and removes the LISTEN_* variables
 * (sd_listen_fds with unset_environment): QEMU and other children must not take them for theirs.
 * The operator socket is the one named "operator", if passed.
 */
export function takeControlSockets(env: NodeJS.ProcessEnv = process.env, pid = process.pid): { control?: number; operator?: number } {
  const fds = listenFdsFromEnv(env, pid);
  // The operator socket is only ever taken by its name: an unnamed one is the control socket.
  const operator = fds.find((f) => f.name === OPERATOR_FD_NAME)?.fd;
  const control = controlSocketFd(fds.filter((f) => f.name !== OPERATOR_FD_NAME));
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  return { ...(control === undefined ? {} : { control }), ...(operator === undefined ? {} : { operator }) };
}
