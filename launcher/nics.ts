// NICs: their spec, the rules of their names and addresses, and their QEMU options. Pure but
// for probeNetdevs: the daemon acts on host state (bridges, TAP devices) through daemon/taps.ts.
import { randomBytes } from 'node:crypto';
import { qemuEnvironment } from './env.js';
import { execaRunner, installationRunContext, type Installation, type ProcessRunner } from './installation.js';
import { LaunchError } from './errors.js';
import { describeValue } from './names.js';
import { formatSpecProblems, type VmSpec } from './spec.js';

export type NicMode = 'bridge' | 'user';
export const NIC_MODES: readonly NicMode[] = ['bridge', 'user'];

export interface HostForward {
  protocol: 'tcp' | 'udp';
  /** `ADDR:PORT` on the host, e.g. `127.0.0.1:2222` (an empty address: every address). */
  host: string;
  /** The port in the guest. */
  guest: number;
}

/** A TAP device on an existing Linux bridge. */
export interface BridgeNic {
  mode: 'bridge';
  bridge: string;
  /** Absent only before create, which generates and records it. */
  mac?: string;
}

/** QEMU's user-mode network (no host set-up), with host port forwards. */
export interface UserNic {
  mode: 'user';
  hostForward: HostForward[];
  /**
   * QEMU's `restrict=on`: the guest reaches neither the host (10.0.2.2 and fec0::2 are the
   * host's loopback) nor beyond it; the host forwards still work. Absent: not restricted. Operators' NICs get it
   * at create (daemon/access.ts) and keep it in the record.
   */
  restrict?: boolean;
  mac?: string;
}

export type NicSpec = BridgeNic | UserNic;

export const NIC_LIMITS = { maxNics: 8, maxForwards: 32 } as const;

/** Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no "/", no white space, not "." or "..". */
export const IFNAME_RE = /^(?!\.\.?$)[A-Za-z0-9_.-]{1,15}$/;
export const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/;
/** The prefix QEMU itself uses for generated MACs; 0x52 has the locally administered bit set. */
export const MAC_PREFIX = '52:54:00';
/**
 * TAP devices vmkeep makes: `vk` + the NIC's MAC in hex + the slot (a or b: a migration's
 * destination takes the slot its source does not use). 15 characters, unique on the host
 * because the MAC is, and recognisable among the host's links.
 */
export const TAP_NAME_RE = /^vk[0-9a-f]{12}[ab]$/;
export type TapSlot = 'a' | 'b';

const NIC_FIELDS: Record<NicMode, readonly string[]> = { bridge: ['mode', 'bridge', 'mac'], user: ['mode', 'hostForward', 'restrict', 'mac'] };
const FORWARD_FIELDS = ['protocol', 'host', 'guest'] as const;
const HOST_RE = /^((?:\d{1,3}\.){3}\d{1,3})?:(\d{1,5})$/;
const NIC_EXAMPLE = '{ "mode": "bridge", "bridge": "br0" } or { "mode": "user", "hostForward": [{ "protocol": "tcp", "host": "127.0.0.1:2222", "guest": 22 }] }';

type Add = (field: string, message: string, fix: string) => void;

/** Checks the `nics` field of a spec (format only: the host is checked by the daemon at create). */
export function checkNics(value: unknown, add: Add, reportUnknown: (obj: Record<string, unknown>, known: readonly string[], prefix: string) => void): NicSpec[] {
  if (value === undefined) return [];
  if (!Array.isArray(value)) {
    add('nics', `must be an array, got ${describeValue(value)}`, `give a list like [${NIC_EXAMPLE}]`);
    return [];
  }
  if (value.length > NIC_LIMITS.maxNics) add('nics', `has ${value.length} entries, the limit is ${NIC_LIMITS.maxNics}`, 'give the VM fewer NICs');
  const nics: NicSpec[] = [];
  const macs = new Map<string, number>();
  const ports = new Map<string, string>();
  value.forEach((entry: unknown, i) => {
    const field = `nics[${i}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
      add(field, `must be an object, got ${describeValue(entry)}`, `give ${NIC_EXAMPLE}`);
      return;
    }
    const nic = entry as Record<string, unknown>;
    const mode = nic.mode;
    if (mode !== 'bridge' && mode !== 'user') {
      add(`${field}.mode`, mode === undefined ? 'is required' : `must be "bridge" or "user", got ${describeValue(mode)}`,
        '"bridge": a TAP device on an existing Linux bridge; "user": QEMU\'s user-mode network, no host set-up');
      return;
    }
    reportUnknown(nic, NIC_FIELDS[mode], `${field}.`);
    let mac: string | undefined;
    if (nic.mac !== undefined) {
      mac = checkMac(nic.mac, `${field}.mac`, add);
      if (mac !== undefined) {
        const earlier = macs.get(mac);
        if (earlier !== undefined) add(`${field}.mac`, `is the same as nics[${earlier}].mac`, 'give each NIC its own MAC, or leave "mac" out to get a generated one');
        else macs.set(mac, i);
      }
    }
    if (mode === 'bridge') {
      const bridge = nic.bridge;
      if (typeof bridge !== 'string' || !IFNAME_RE.test(bridge)) {
        add(`${field}.bridge`, bridge === undefined ? 'is required' : `${describeValue(bridge)} is not a network interface name`,
          'name an existing Linux bridge, e.g. "br0" (at most 15 characters; `ip -br link show type bridge` lists them)');
        return;
      }
      nics.push({ mode, bridge, ...(mac === undefined ? {} : { mac }) });
      return;
    }
    const hostForward = checkForwards(nic.hostForward, `${field}.hostForward`, add, reportUnknown, ports);
    const restrict = nic.restrict;
    if (restrict !== undefined && typeof restrict !== 'boolean') {
      add(`${field}.restrict`, `must be true or false, got ${describeValue(restrict)}`,
        'true: the guest reaches neither the host nor beyond it, only the host forwards reach the guest; false or absent: it reaches both');
      return;
    }
    if (hostForward !== undefined) nics.push({ mode, hostForward, ...(restrict === undefined ? {} : { restrict }), ...(mac === undefined ? {} : { mac }) });
  });
  return nics;
}

function checkMac(value: unknown, field: string, add: Add): string | undefined {
  const fix = `give six hex bytes like "${MAC_PREFIX}:12:34:56" (a unicast address), or leave "mac" out to get a generated one`;
  if (typeof value !== 'string' || !MAC_RE.test(value.toLowerCase())) {
    add(field, `${describeValue(value)} is not a MAC address`, fix);
    return undefined;
  }
  const mac = value.toLowerCase();
  if ((parseInt(mac.slice(0, 2), 16) & 1) === 1) {
    add(field, `${mac} is a multicast address`, fix);
    return undefined;
  }
  if (mac === '00:00:00:00:00:00') {
    add(field, 'is all zeros', fix);
    return undefined;
  }
  return mac;
}

function checkForwards(
  value: unknown, field: string, add: Add, reportUnknown: (obj: Record<string, unknown>, known: readonly string[], prefix: string) => void,
  ports: Map<string, string>,
): HostForward[] | undefined {
  if (value === undefined) return [];
  const fix = 'give a list like [{ "protocol": "tcp", "host": "127.0.0.1:2222", "guest": 22 }]';
  if (!Array.isArray(value)) {
    add(field, `must be an array, got ${describeValue(value)}`, fix);
    return undefined;
  }
  if (value.length > NIC_LIMITS.maxForwards) add(field, `has ${value.length} entries, the limit is ${NIC_LIMITS.maxForwards}`, 'forward fewer ports');
  const forwards: HostForward[] = [];
  value.forEach((entry: unknown, i) => {
    const f = `${field}[${i}]`;
    if (typeof entry !== 'object' || entry === null || Array.isArray(entry)) {
      add(f, `must be an object, got ${describeValue(entry)}`, fix);
      return;
    }
    const fwd = entry as Record<string, unknown>;
    reportUnknown(fwd, FORWARD_FIELDS, `${f}.`);
    const protocol = fwd.protocol;
    if (protocol !== 'tcp' && protocol !== 'udp') add(`${f}.protocol`, `must be "tcp" or "udp", got ${describeValue(protocol)}`, 'use "tcp" or "udp"');
    const host = typeof fwd.host === 'string' ? HOST_RE.exec(fwd.host) : null;
    const hostOk = host !== null && validPort(Number(host[2])) && (host[1] === undefined || host[1].split('.').every((o) => Number(o) <= 255));
    if (!hostOk) add(`${f}.host`, `${describeValue(fwd.host)} is not ADDR:PORT`, 'give an IPv4 address and a port from 1 to 65535, e.g. "127.0.0.1:2222" (":2222" listens on every address)');
    const guest = fwd.guest;
    const guestOk = typeof guest === 'number' && validPort(guest);
    if (!guestOk) add(`${f}.guest`, `${describeValue(guest)} is not a port`, 'give the guest\'s port, a whole number from 1 to 65535');
    if ((protocol === 'tcp' || protocol === 'udp') && hostOk && guestOk) {
      const forward: HostForward = { protocol, host: fwd.host as string, guest };
      const key = forwardKey(forward);
      const earlier = ports.get(key);
      if (earlier !== undefined) add(`${f}.host`, `${protocol} port ${host[2]} is already forwarded by ${earlier}`, 'forward each host port once');
      else ports.set(key, f);
      forwards.push(forward);
    }
  });
  return forwards;
}

function validPort(port: number): boolean {
  return Number.isInteger(port) && port >= 1 && port <= 65535;
}

/** A checked forward's host side: its address ('' for every address) and port. */
export function forwardHost(forward: HostForward): { address: string; port: number } {
  const cut = forward.host.lastIndexOf(':');
  return { address: forward.host.slice(0, cut), port: Number(forward.host.slice(cut + 1)) };
}

/** Two forwards collide when they take the same protocol and port (any address overlaps 0.0.0.0). */
export function forwardKey(forward: HostForward): string {
  return `${forward.protocol}:${forwardHost(forward).port}`;
}

/** A MAC with the 52:54:00 prefix that none of `taken` has. `random` is swapped in tests. */
export function generateMac(taken: ReadonlySet<string>, random: (n: number) => Buffer = randomBytes): string {
  for (;;) {
    const mac = `${MAC_PREFIX}:${[...random(3)].map((b) => b.toString(16).padStart(2, '0')).join(':')}`;
    if (!taken.has(mac)) return mac;
  }
}

/** The NICs with a MAC each: the given ones kept, the missing ones generated, unique among `taken` and each other. */
export function withMacs(nics: readonly NicSpec[], taken: ReadonlySet<string>, random?: (n: number) => Buffer): NicSpec[] {
  const used = new Set([...taken, ...nics.flatMap((n) => (n.mac === undefined ? [] : [n.mac]))]);
  return nics.map((nic) => {
    if (nic.mac !== undefined) return nic;
    const mac = generateMac(used, random);
    used.add(mac);
    return { ...nic, mac };
  });
}

/** The TAP device of a bridge NIC with this MAC in one slot. */
export function tapName(mac: string, slot: TapSlot): string {
  return `vk${mac.replaceAll(':', '')}${slot}`;
}

/** The slot a new QEMU of the VM takes: the one no other QEMU of the VM (`inUse`: their TAP names) holds. */
export function freeTapSlot(inUse: readonly string[]): TapSlot {
  return inUse.some((name) => name.endsWith('a')) ? 'b' : 'a';
}

/**
 * The TAP names of one QEMU of the VM, one per NIC (undefined for user-mode NICs), in `slot`.
 * Throws on a NIC without a MAC: create records one for every NIC.
 */
export function tapsFor(nics: readonly NicSpec[], slot: TapSlot): Array<string | undefined> {
  return nics.map((nic) => {
    if (nic.mac === undefined) throw new Error('a NIC without a recorded MAC: records get one at create');
    return nic.mode === 'bridge' ? tapName(nic.mac, slot) : undefined;
  });
}

/** The `-netdev` id of NIC `i` (the same in every QEMU of the VM: QMP's hostfwd commands name it). */
export function netdevId(index: number): string {
  return `net${index}`;
}

/** QEMU's hostfwd rule text: `tcp:127.0.0.1:2222-:22`. */
export function hostfwdRule(forward: HostForward): string {
  return `${forward.protocol}:${forward.host}-:${forward.guest}`;
}

/**
 * The QEMU options of the NICs. Bridge NICs open their persistent TAP by name (daemon/taps.ts
 * made it and attached it to the bridge; README "Networking" says why not an inherited fd).
 * `withForwards: false` (a migration's destination): user-mode NICs start without their host
 * forwards, which the source still holds; they are added at the hand-over.
 */
export function nicArgs(nics: readonly NicSpec[], taps: ReadonlyArray<string | undefined>, withForwards: boolean): string[] {
  const argv: string[] = [];
  nics.forEach((nic, i) => {
    const id = netdevId(i);
    if (nic.mode === 'bridge') {
      const tap = taps[i];
      if (tap === undefined) throw new Error(`NIC ${i} (bridge ${nic.bridge}) has no TAP device`);
      argv.push('-netdev', `tap,id=${id},ifname=${tap},script=no,downscript=no`);
    } else {
      const forwards = withForwards ? nic.hostForward.map((f) => `,hostfwd=${hostfwdRule(f)}`).join('') : '';
      // Every QEMU of the VM, a migration's destination included: restrict is the record's.
      argv.push('-netdev', `user,id=${id}${nic.restrict === true ? ',restrict=on' : ''}${forwards}`);
    }
    if (nic.mac === undefined) throw new Error(`NIC ${i} has no MAC: records get one at create`);
    argv.push('-device', `virtio-net-pci,netdev=${id},mac=${nic.mac}`);
  });
  return argv;
}

/** The backends `qemu-system-* -netdev help` lists (e.g. tap, user: user only in builds with libslirp). */
export function parseNetdevHelp(output: string): string[] {
  return output.split('\n').map((l) => l.trim()).filter((l) => /^[a-z][a-z0-9-]*$/.test(l));
}

/**
 * The network backends an installation's QEMU was built with (`-netdev help`). A QEMU built
 * without libslirp lacks `user`. Never throws: a binary that cannot answer lists nothing.
 */
export async function probeNetdevs(inst: Installation, run: ProcessRunner = execaRunner): Promise<string[]> {
  const { firmwareArgs, env } = installationRunContext(inst);
  const result = await run(inst.binary, [...firmwareArgs, '-netdev', 'help'], { env: qemuEnvironment(env), timeoutMs: 30_000 })
    .catch(() => ({ exitCode: 1, stdout: '' }));
  return result.exitCode === 0 ? parseNetdevHelp(result.stdout) : [];
}

/**
 * A spec for a QEMU run without vmkeepd (`vmkeep run`): user-mode NICs get MACs for this run;
 * bridge NICs are refused, since their TAP is made and owned by vmkeepd.
 */
export function nicsForForegroundRun(spec: VmSpec): VmSpec {
  if (spec.nics === undefined) return spec;
  const problems = spec.nics.flatMap((nic, i) => (nic.mode !== 'bridge' ? [] : [{
    field: `nics[${i}].mode`, message: 'a bridge NIC needs vmkeepd, which makes and owns its TAP device',
    fix: 'create the VM with vmkeep create (vmkeepd running), or use { "mode": "user" } with vmkeep run',
  }]));
  if (problems.length > 0) throw new LaunchError('INVALID_SPEC', formatSpecProblems(problems), { problems });
  return { ...spec, nics: withMacs(spec.nics, new Set()) };
}
