// NICs on the host: the checks of a new VM's NICs against the host and the other VMs (pure),
// and the TAP devices vmkeepd makes for bridge NICs. A TAP's life follows its QEMU, not the
// daemon's: it is removed only once no record names it, which happens only after its QEMU is
// gone (ARCHITECTURE.md, "Networking").
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

export interface NetPort {
  /** Every link: its name and kind (`bridge`, `tun`, ...; undefined for a plain device). */
  links(): Promise<Array<{ name: string; kind: string | undefined }>>;
  /**
   * Makes the persistent TAP `name` (kept if it exists), attaches it to `bridge`, brings it up.
   * `owner`: the uid/gid QEMU runs as, which may then open it without CAP_NET_ADMIN.
   */
  addTap(name: string, bridge: string, owner?: TapOwner): Promise<void>;
  /** Removes the TAP `name`; a missing one is fine. */
  removeTap(name: string): Promise<void>;
}

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
    return (JSON.parse(listed.stdout) as Array<{ ifname: string; linkinfo?: { info_kind?: string } }>)
      .map((l) => ({ name: l.ifname, kind: l.linkinfo?.info_kind }));
  },
  async addTap(name, bridge, owner) {
    if (!(await linkExists(name))) {
      // Persistent: it outlives the QEMU that opens it (and a restart of vmkeepd); owned by
      // QEMU's user, which opens it by name without CAP_NET_ADMIN (ARCHITECTURE.md, invariant 11).
      const args = ['tuntap', 'add', 'dev', name, 'mode', 'tap', ...(owner === undefined ? [] : ['user', String(owner.uid), 'group', String(owner.gid)])];
      const made = await ip(args);
      if (!made.ok) throw new Error(`ip ${args.join(' ')} failed: ${made.stderr}`);
    }
    const attached = await ip(['link', 'set', 'dev', name, 'master', bridge, 'up']);
    if (!attached.ok) throw new Error(`ip link set dev ${name} master ${bridge} up failed: ${attached.stderr}`);
  },
  async removeTap(name) {
    const removed = await ip(['link', 'del', 'dev', name]);
    if (!removed.ok && (await linkExists(name))) throw new Error(`ip link del dev ${name} failed: ${removed.stderr}`);
  },
};

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
