// sd_notify for a Type=notify unit. The notify socket is a unix datagram socket, which Node
// cannot write to; so one small shell is started as soon as the daemon starts (while it still
// loads and reattaches) and sends each message with systemd-notify when told to over its stdin.
// At READY only a line is written: no Node fork at that moment, no process library loaded.
import { spawn, type ChildProcess } from 'node:child_process';

export interface Notifier {
  /** Sends these assignments (READY=1, STATUS=...) as one message; a no-op without NOTIFY_SOCKET. */
  send(...assignments: string[]): void;
  /** Lets the helper go (it also ends by itself when this process dies: its stdin closes). */
  close(): void;
}

/**
 * One line on stdin per message, assignments separated by tabs. Run as root, systemd-notify
 * sends with the daemon's PID (--pid), so the default NotifyAccess=main accepts it (as in the
 * unit snapd writes); snap/vmkeepd.service sets NotifyAccess=all for a daemon that does not run
 * as root. A failure is written to the daemon's stderr, i.e. its log.
 */
const HELPER = [
  'pid=$1',
  'tab=$(printf "\\t")',
  'while IFS= read -r line; do',
  '  set -f; IFS=$tab; set -- $line; unset IFS',
  '  systemd-notify --pid="$pid" "$@" || echo "vmkeepd: systemd-notify $* failed; the unit may time out (run vmkeepd as root, or set NotifyAccess=all)" >&2',
  'done',
].join('\n');

const noop: Notifier = { send() {}, close() {} };

/** Text that fits one assignment of the helper's line protocol. */
export function notifyField(text: string): string {
  return text.replace(/[\t\r\n]+/g, ' ');
}

export function startNotifier(env: NodeJS.ProcessEnv = process.env): Notifier {
  if (!env['NOTIFY_SOCKET']) return noop;
  let helper: ChildProcess | undefined = spawn('sh', ['-c', HELPER, 'sh', String(process.pid)], {
    stdio: ['pipe', 'ignore', 'inherit'],
    env,
  });
  helper.once('error', () => (helper = undefined));
  helper.once('exit', () => (helper = undefined));
  // Neither keeps the daemon's event loop alive.
  helper.unref();
  (helper.stdin as unknown as { unref?: () => void } | null)?.unref?.();
  helper.stdin?.on('error', () => undefined);
  return {
    send(...assignments) {
      helper?.stdin?.write(`${assignments.map(notifyField).join('\t')}\n`);
    },
    close() {
      helper?.stdin?.end();
      helper = undefined;
    },
  };
}
