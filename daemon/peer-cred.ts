// The caller's uid, gid and pid from the kernel (SO_PEERCRED), for the log of who did what
// (ARCHITECTURE.md, invariant 11). Node has no getsockopt: the accepted socket is handed to a
// short perl (perl-base is part of every Debian and Ubuntu system) as its fd 3, which asks the
// kernel and prints the three numbers. Nothing the client sends is trusted for this; the access
// level itself comes from which socket was used, never from these numbers.
import { spawn } from 'node:child_process';
import type { Socket } from 'node:net';

export interface PeerCredentials {
  pid: number;
  uid: number;
  gid: number;
}

const PEERCRED_SCRIPT = 'use Socket; open(my $s, "+<&=", 3) or die "fd 3: $!"; '
  + 'my $c = getsockopt($s, SOL_SOCKET, SO_PEERCRED) or die "SO_PEERCRED: $!"; print join(" ", unpack("lLL", $c)), "\\n";';
const PEERCRED_TIMEOUT_MS = 5_000;

/** The descriptor behind an accepted unix socket (Node keeps it on its handle). */
function socketFd(socket: Socket): number | undefined {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' && fd >= 0 ? fd : undefined;
}

/** Parses the helper's "PID UID GID" line (pure). */
export function parsePeerCredentials(line: string): PeerCredentials | undefined {
  const m = /^(\d+) (\d+) (\d+)\s*$/.exec(line);
  return m === null ? undefined : { pid: Number(m[1]), uid: Number(m[2]), gid: Number(m[3]) };
}

/**
 * The peer's credentials, or an error saying why they could not be read (no perl, a socket
 * already closed). A pid of 0 is a peer outside vmkeepd's PID namespace.
 */
export function peerCredentials(socket: Socket, perl = 'perl'): Promise<PeerCredentials> {
  const fd = socketFd(socket);
  if (fd === undefined) return Promise.reject(new Error('the socket has no descriptor'));
  return new Promise((resolve, reject) => {
    const child = spawn(perl, ['-e', PEERCRED_SCRIPT], { stdio: ['ignore', 'pipe', 'pipe', fd], timeout: PEERCRED_TIMEOUT_MS });
    let out = '';
    let err = '';
    child.stdout?.on('data', (chunk: Buffer) => { out += chunk.toString(); });
    child.stderr?.on('data', (chunk: Buffer) => { err += chunk.toString(); });
    child.once('error', (error) => reject(new Error(`cannot run ${perl} for SO_PEERCRED: ${error.message}`)));
    child.once('close', (code) => {
      const creds = parsePeerCredentials(out);
      if (code === 0 && creds !== undefined) resolve(creds);
      else reject(new Error(`SO_PEERCRED through ${perl} failed (exit ${String(code)}): ${err.trim() || out.trim()}`));
    });
  });
}
