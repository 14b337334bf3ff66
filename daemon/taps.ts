// NICs on the host: the checks of a new VM's NICs against the host and the other VMs (pure),
// and the TAP devices vmkeepd makes for bridge NICs. A TAP's life follows its QEMU, not the
// daemon's: it is removed only once no record names it, which happens only after its QEMU is
// gone (ARCHITECTURE.md, "Networking").
import { spawn, type ChildProcess } from 'node:child_process';
import {
  forwardKey, formatSpecProblems, freeTapSlot, LaunchError, TAP_NAME_RE, tapsFor,
  type NicSpec, type SpecProblem, type VmSpec,
} from '../launcher/index.js';
import type { Logger } from './log.js';
import type { VmRecord } from './records.js';

/**
 * The links of vmkeepd's network namespace, as it sees and changes them; unit tests pass a fake.
 * Read over netlink (`ip -j`), not /sys/class/net: /sys shows the namespace of whoever mounted
 * it, which need not be vmkeepd's.
 */
/** Who may open a TAP: QEMU's unprivileged user (ARCHITECTURE.md, invariant 11). */
export interface TapOwner {
  uid: number;
  gid: number;
}

/** One link of the host, as `ip -j -d link show` gives it. */
export interface HostLink {
  name: string;
  /** `bridge`, `tun`, ...; undefined for a plain device. */
  kind: string | undefined;
  /** The bridge it is attached to, if any. */
  master?: string | undefined;
  /** Administratively up (the UP flag), whatever its carrier. */
  up?: boolean;
}

/** A running watch of the host's links (`ip monitor link`). */
export interface LinkWatch {
  /** Ends it (the child process included); resolves once it is gone. */
  close(): Promise<void>;
}

export interface NetPort {
  /** Every link of the namespace. */
  links(): Promise<HostLink[]>;
  /**
   * Makes the persistent TAP `name` (kept if it exists), attaches it to `bridge`, brings it up.
   * `owner`: the uid/gid QEMU runs as, which may then open it without CAP_NET_ADMIN.
   */
  addTap(name: string, bridge: string, owner?: TapOwner): Promise<void>;
  /** Attaches the existing TAP `name` to `bridge` and brings it up; never makes one. */
  attachTap(name: string, bridge: string): Promise<void>;
  /** Removes the TAP `name`; a missing one is fine. */
  removeTap(name: string): Promise<void>;
  /**
   * Calls `onChange` whenever a link changes (one call per change: the caller debounces), and
   * once after each restart of the watch, whose gap may have hidden changes. `onProblem`: the
   * watch ended by itself or could not start (it is started again).
   */
  watchLinks(onChange: () => void, onProblem: (message: string) => void): LinkWatch;
}

/**
 * A dead `ip monitor` is started again after 1 s, doubled at each death in a row up to 60 s (a
 * host without `ip` must not spin); one that ran a minute counts as healthy again.
 */
const LINK_WATCH_RESTART_MS = { first: 1_000, max: 60_000, healthy: 60_000 } as const;

/** Runs `ip` (iproute2): Node has no ioctl, and iproute2 is on every host that has bridges. */
async function ip(args: string[]): Promise<{ ok: boolean; stdout: string; stderr: string }> {
  const { execa } = await import('execa');
  const result = await execa('ip', args, { reject: false, stdin: 'ignore', timeout: 10_000 });
  if (result.exitCode === undefined) {
    throw new Error(`cannot run ip (${result.shortMessage}); fix: install iproute2`);
  }
  return { ok: result.exitCode === 0, stdout: String(result.stdout ?? ''), stderr: String(result.stderr ?? '').trim() };
}

async function linkExists(name: string): Promise<boolean> {
  return (await ip(['link', 'show', 'dev', name])).ok;
}

export const realNet: NetPort = {
  async links() {
    const listed = await ip(['-j', '-d', 'link', 'show']);
    if (!listed.ok) throw new Error(`ip -j -d link show failed: ${listed.stderr}`);
    return (JSON.parse(listed.stdout) as Array<{ ifname: string; master?: string; flags?: string[]; linkinfo?: { info_kind?: string } }>)
      .map((l) => ({ name: l.ifname, kind: l.linkinfo?.info_kind, master: l.master, up: (l.flags ?? []).includes('UP') }));
  },
  async addTap(name, bridge, owner) {
    if (!(await linkExists(name))) {
      // Persistent: it outlives the QEMU that opens it (and a restart of vmkeepd); owned by
      // QEMU's user, which opens it by name without CAP_NET_ADMIN (ARCHITECTURE.md, invariant 11).
      const args = ['tuntap', 'add', 'dev', name, 'mode', 'tap', ...(owner === undefined ? [] : ['user', String(owner.uid), 'group', String(owner.gid)])];
      const made = await ip(args);
      if (!made.ok) throw new Error(`ip ${args.join(' ')} failed: ${made.stderr}`);
    }
    await realNet.attachTap(name, bridge);
  },
  async attachTap(name, bridge) {
    const attached = await ip(['link', 'set', 'dev', name, 'master', bridge, 'up']);
    if (!attached.ok) throw new Error(`ip link set dev ${name} master ${bridge} up failed: ${attached.stderr}`);
  },
  async removeTap(name) {
    const removed = await ip(['link', 'del', 'dev', name]);
    if (!removed.ok && (await linkExists(name))) throw new Error(`ip link del dev ${name} failed: ${removed.stderr}`);
  },
  watchLinks(onChange, onProblem) {
    return watchWithIpMonitor(onChange, onProblem);
  },
};

/**
 * A long-lived `ip monitor link` (netlink events of vmkeepd's namespace: one line, or a few, per
 * change), started again LINK_WATCH_RESTART_MS after it ends, until closed. Under systemd a
 * vmkeepd that dies takes it along (the service's control group); elsewhere it ends at its next
 * write into the closed pipe.
 */
function watchWithIpMonitor(onChange: () => void, onProblem: (message: string) => void): LinkWatch {
  let child: ChildProcess | undefined;
  let closed = false;
  let timer: NodeJS.Timeout | undefined;
  let delay: number = LINK_WATCH_RESTART_MS.first;
  const start = (): void => {
    timer = undefined;
    if (closed) return;
    const began = performance.now();
    const proc = spawn('ip', ['monitor', 'link'], { stdio: ['ignore', 'pipe', 'pipe'] });
    child = proc;
    let stderr = '';
    proc.stdout?.setEncoding('utf8').on('data', () => onChange());
    proc.stderr?.setEncoding('utf8').on('data', (text: string) => { stderr = (stderr + text).slice(-500); });
    proc.once('error', (error) => onProblem(`cannot run ip monitor link (${error.message}); fix: install iproute2`));
    proc.once('close', (code, signal) => {
      child = undefined;
      if (closed) return;
      if (performance.now() - began >= LINK_WATCH_RESTART_MS.healthy) delay = LINK_WATCH_RESTART_MS.first;
      onProblem(`ip monitor link ended (${signal ?? `exit ${String(code)}`}${stderr.trim() === '' ? '' : `: ${stderr.trim()}`}); started again in ${delay} ms`);
      timer = setTimeout(start, delay);
      delay = Math.min(delay * 2, LINK_WATCH_RESTART_MS.max);
    });
    // Changes while no monitor listened are not replayed: look once now.
    proc.once('spawn', () => onChange());
  };
  start();
  return {
    async close() {
      closed = true;
      clearTimeout(timer);
      const proc = child;
      if (proc === undefined || proc.exitCode !== null || proc.signalCode !== null) return;
      const gone = new Promise<void>((resolve) => proc.once('close', () => resolve()));
      proc.kill('SIGTERM');
      await gone;
    },
  };
}

/**
 * What is wrong with a new VM's NICs on this host: a bridge that does not exist, a MAC another
 * VM has, a host port another VM forwards, user mode on a QEMU built without it. Pure.
 */
export function nicHostProblems(
  nics: readonly NicSpec[], others: readonly VmSpec[], host: { bridges: ReadonlySet<string>; netdevs: readonly string[] },
): SpecProblem[] {
  const problems: SpecProblem[] = [];
  const macOwner = new Map<string, string>();
  const portOwner = new Map<string, string>();
  for (const other of others) {
    for (const nic of other.nics ?? []) {
      if (nic.mac !== undefined) macOwner.set(nic.mac, other.name);
      if (nic.mode === 'user') for (const f of nic.hostForward) portOwner.set(forwardKey(f), other.name);
    }
  }
  nics.forEach((nic, i) => {
    const field = `nics[${i}]`;
    if (nic.mac !== undefined && macOwner.has(nic.mac)) {
      problems.push({ field: `${field}.mac`, message: `${nic.mac} is taken by VM ${macOwner.get(nic.mac) ?? ''}`, fix: 'give another MAC, or leave "mac" out to get a generated one' });
    }
    if (nic.mode === 'bridge' && !host.bridges.has(nic.bridge)) {
      problems.push({
        field: `${field}.bridge`, message: `no Linux bridge named ${nic.bridge} on this host`,
        fix: `create it first (e.g. \`ip link add ${nic.bridge} type bridge && ip link set ${nic.bridge} up\`, or in your network configuration), or name an existing one (\`ip -br link show type bridge\`)`,
      });
    }
    if (nic.mode === 'user') {
      if (!host.netdevs.includes('user')) {
        problems.push({
          field: `${field}.mode`, message: 'this installation\'s QEMU has no user-mode network (built without libslirp: `-netdev help` does not list "user")',
          fix: 'use a QEMU built with libslirp (Debian and Ubuntu packages are), or a bridge NIC',
        });
      }
      nic.hostForward.forEach((f, j) => {
        const owner = portOwner.get(forwardKey(f));
        if (owner !== undefined) {
          problems.push({ field: `${field}.hostForward[${j}].host`, message: `${f.protocol} port ${f.host} is already forwarded by VM ${owner}`, fix: 'forward another host port' });
        }
      });
    }
  });
  return problems;
}

/** Throws the host problems of a new VM's NICs as INVALID_SPEC (like every other field's). */
export function refuseNicHostProblems(problems: readonly SpecProblem[]): void {
  if (problems.length > 0) throw new LaunchError('INVALID_SPEC', formatSpecProblems(problems), { problems });
}

/** Every TAP a record names: its QEMU's, a migration destination's, a finished migration's source's. */
export function tapsClaimed(record: Pick<VmRecord, 'process' | 'refresh' | 'retired'>): string[] {
  return [...(record.process?.taps ?? []), ...(record.refresh?.destination?.taps ?? []), ...(record.retired?.taps ?? [])];
}

/** The TAP names a new QEMU of the VM gets: one per bridge NIC, in the slot no other QEMU of it holds. */
export function tapsForNewQemu(record: Pick<VmRecord, 'spec' | 'process' | 'refresh' | 'retired'>): Array<string | undefined> {
  return tapsFor(record.spec.nics ?? [], freeTapSlot(tapsClaimed(record)));
}

/** The defined names among a QEMU's TAPs (user-mode NICs have none), for its record. */
export function tapList(taps: ReadonlyArray<string | undefined>): string[] {
  return taps.filter((t): t is string => t !== undefined);
}

/** The names of the Linux bridges among the links. */
export async function bridgesOf(net: NetPort): Promise<Set<string>> {
  return new Set((await net.links()).filter((l) => l.kind === 'bridge').map((l) => l.name));
}

/** Links with vmkeep's TAP name pattern that no record names: reported, never removed (a record may be damaged). */
export function orphanTaps(links: readonly string[], claimed: ReadonlySet<string>): string[] {
  return links.filter((l) => TAP_NAME_RE.test(l) && !claimed.has(l)).sort();
}

/**
 * Serialises vmkeepd's TAP changes (one `ip` at a time, in order), so a TAP released by one
 * QEMU's end and made again for the next start of the VM never race.
 */
export class TapKeeper {
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly net: NetPort, private readonly logger: Logger, private readonly owner?: TapOwner) {}

  /** Makes the TAPs of a new QEMU, each attached to its NIC's bridge; undoes them all on failure. */
  make(vm: string, nics: readonly NicSpec[], taps: ReadonlyArray<string | undefined>): Promise<void> {
    return this.enqueue(async () => {
      const made: string[] = [];
      if (!nics.some((n) => n.mode === 'bridge')) return;
      const bridges = await bridgesOf(this.net);
      try {
        for (const [i, nic] of nics.entries()) {
          const tap = taps[i];
          if (nic.mode !== 'bridge' || tap === undefined) continue;
          if (!bridges.has(nic.bridge)) {
            throw new Error(`bridge ${nic.bridge} of ${vm}'s nics[${i}] does not exist (any more); fix: create it, then start ${vm} again`);
          }
          made.push(tap);
          await this.net.addTap(tap, nic.bridge, this.owner);
        }
      } catch (error) {
        for (const tap of made) await this.net.removeTap(tap).catch(() => undefined);
        throw error;
      }
    });
  }

  /** Removes TAPs whose QEMU is gone (queued; a failure is logged: the TAP is then reported as an orphan). */
  release(vm: string, taps: readonly string[]): Promise<void> {
    if (taps.length === 0) return Promise.resolve();
    return this.enqueue(async () => {
      for (const tap of taps) {
        await this.net.removeTap(tap).catch((error: unknown) => this.logger.warn({ vm, tap, err: error }, `could not remove TAP ${tap}; it stays and is reported`));
      }
    });
  }

  /** Runs `work` between the queued changes (a repair of TAPs sees no half-made or half-removed one). */
  exclusive(work: () => Promise<void>): Promise<void> {
    return this.enqueue(work);
  }

  private enqueue(work: () => Promise<void>): Promise<void> {
    const run = this.queue.then(work);
    this.queue = run.catch(() => undefined);
    return run;
  }
}

/** The TAPs a record change lets go: named before, not after (their QEMU is gone or never ran the guest). */
export function tapsReleased(before: Pick<VmRecord, 'process' | 'refresh' | 'retired'>, after: Pick<VmRecord, 'process' | 'refresh' | 'retired'>): string[] {
  const kept = new Set(tapsClaimed(after));
  return tapsClaimed(before).filter((t) => !kept.has(t));
}
