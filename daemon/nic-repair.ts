// Running VMs' TAPs kept on their bridges while the host's network is reconfigured (a network
// restart deletes and makes the bridge again, or takes ports off it): `planTapRepairs` decides
// from the records and the host's links (pure); `NicRepair` looks at reattach and at every link
// change (`ip monitor link`), puts TAPs back and reports what it cannot mend (ARCHITECTURE.md,
// "Networking").
import { tapsFor, type NicSpec } from '../launcher/index.js';
import type { Logger } from './log.js';
import type { DaemonEvent, NicProblem } from './model.js';
import type { VmRecord } from './records.js';
import type { HostLink, LinkWatch, NetPort, TapKeeper } from './taps.js';
import type { VmEntry } from './vm-entry.js';

/** One TAP of a running QEMU and the bridge its NIC belongs on. */
export interface RunningTap {
  nic: number;
  tap: string;
  bridge: string;
}

/** What to do about one TAP: nothing, put it back on its bridge (and up), or report it. */
export type TapAction = 'none' | 'attach' | 'bridge-missing' | 'tap-gone';

export interface TapDecision extends RunningTap {
  vm: string;
  action: TapAction;
  /** attach: what is wrong now (e.g. "on no bridge", "down"). */
  why?: string;
}

/** The TAPs of the QEMU that runs the guest, each with its NIC's bridge (none without a QEMU). */
export function runningTaps(record: Pick<VmRecord, 'spec' | 'process'>): RunningTap[] {
  const named = new Set(record.process?.taps ?? []);
  if (named.size === 0) return [];
  const nics: readonly NicSpec[] = record.spec.nics ?? [];
  const slots = [tapsFor(nics, 'a'), tapsFor(nics, 'b')];
  return nics.flatMap((nic, i) => {
    if (nic.mode !== 'bridge') return [];
    const tap = slots.map((s) => s[i]).find((t) => t !== undefined && named.has(t));
    return tap === undefined ? [] : [{ nic: i, tap, bridge: nic.bridge }];
  });
}

/**
 * Per TAP of each running VM: `tap-gone` when no link has its name (QEMU's descriptor points at
 * a device that no longer exists: a TAP made again by name would not reach it), else
 * `bridge-missing` when its bridge is not there, else `attach` when it is on another master or
 * none, or not administratively up (a TAP whose QEMU holds it has carrier once up), else `none`.
 */
export function planTapRepairs(vms: ReadonlyArray<{ vm: string; taps: readonly RunningTap[] }>, links: readonly HostLink[]): TapDecision[] {
  const byName = new Map(links.map((l) => [l.name, l]));
  return vms.flatMap(({ vm, taps }) => taps.map((t): TapDecision => {
    const link = byName.get(t.tap);
    if (link === undefined) return { vm, ...t, action: 'tap-gone' };
    if (byName.get(t.bridge)?.kind !== 'bridge') return { vm, ...t, action: 'bridge-missing' };
    if (link.master !== t.bridge) return { vm, ...t, action: 'attach', why: link.master === undefined ? 'on no bridge' : `on ${link.master}` };
    if (link.up !== true) return { vm, ...t, action: 'attach', why: 'down' };
    return { vm, ...t, action: 'none' };
  }));
}

/**
 * The status line of a decision that leaves a problem (undefined: none). `failure`: why an
 * attach was not done (repair off, or `ip` failed).
 */
export function nicProblemOf(d: TapDecision, failure?: string): NicProblem | undefined {
  const base = { nic: d.nic, tap: d.tap, bridge: d.bridge };
  switch (d.action) {
    case 'none':
      return undefined;
    case 'attach':
      if (failure === undefined) return undefined;
      return {
        ...base, problem: 'detached', message: `TAP ${d.tap} is ${d.why ?? 'off its bridge'}, not on ${d.bridge}: the guest's NIC is cut off (${failure})`,
        fix: `ip link set dev ${d.tap} master ${d.bridge} up`,
      };
    case 'bridge-missing':
      return {
        ...base, problem: 'bridge-missing', message: `bridge ${d.bridge} does not exist: the guest's NIC is cut off; vmkeepd puts TAP ${d.tap} back on it as soon as it exists`,
        fix: `create the bridge again (your network configuration, or \`ip link add ${d.bridge} type bridge && ip link set ${d.bridge} up\`)`,
      };
    case 'tap-gone':
      return {
        ...base, problem: 'tap-gone', message: `TAP ${d.tap} was deleted under the running QEMU: the guest's NIC is cut off and cannot be mended in place`,
        fix: `vmkeep stop ${d.vm} && vmkeep start ${d.vm} (the guest restarts; its new QEMU gets a new TAP)`,
      };
  }
}

export interface NicRepairHost {
  entries(): VmEntry[];
  net: NetPort;
  taps: TapKeeper;
  logger: Logger;
  emit(event: Omit<DaemonEvent, 'time'>): void;
  isClosed(): boolean;
}

/** Link changes come in bursts (a bridge and its ports, one line each): one look after they settle. */
export const LINK_CHANGE_DEBOUNCE_MS = 200;

/**
 * Looks at the running VMs' TAPs and acts on planTapRepairs: puts detached TAPs back (unless
 * `repair` is off: then only reports), records each VM's problems for its view, logs and emits
 * a `vm-network` event for each repair and each new problem. Runs inside the TapKeeper's queue,
 * so it never sees a TAP half-made or half-removed.
 */
export class NicRepair {
  private timer: NodeJS.Timeout | undefined;
  private watch: LinkWatch | undefined;
  private running: Promise<void> = Promise.resolve();

  constructor(private readonly host: NicRepairHost, private readonly repair: boolean) {}

  /** Looks now (after the checks already queued); resolves once done. Never throws. */
  check(reason: string): Promise<void> {
    this.running = this.host.taps.exclusive(() => this.checkNow(reason))
      .catch((error: unknown) => this.host.logger.warn({ err: error }, `could not check the TAPs of running VMs (${reason})`));
    return this.running;
  }

  /** Watches the host's links until close(): each burst of changes is one check. */
  start(): void {
    if (this.watch !== undefined || this.host.isClosed()) return;
    this.watch = this.host.net.watchLinks(
      () => this.schedule(),
      (message) => this.host.logger.warn({}, `watching the host's links: ${message}`),
    );
  }

  async close(): Promise<void> {
    clearTimeout(this.timer);
    this.timer = undefined;
    await this.watch?.close();
    this.watch = undefined;
    await this.running;
  }

  private schedule(): void {
    if (this.timer !== undefined) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (!this.host.isClosed()) void this.check('the host\'s links changed');
    }, LINK_CHANGE_DEBOUNCE_MS);
  }

  private async checkNow(reason: string): Promise<void> {
    const entries = this.host.entries();
    const vms = entries.map((e) => ({ vm: e.record.name, taps: runningTaps(e.record) }));
    if (vms.every((v) => v.taps.length === 0)) {
      for (const e of entries) delete e.nicProblems;
      return;
    }
    const decisions = planTapRepairs(vms, await this.host.net.links());
    const problems = new Map<string, NicProblem[]>();
    for (const d of decisions) {
      let failure: string | undefined;
      if (d.action === 'attach') failure = this.repair ? await this.attach(d, reason) : 'repair is off (--no-tap-repair)';
      const problem = nicProblemOf(d, failure);
      if (problem !== undefined) problems.set(d.vm, [...(problems.get(d.vm) ?? []), problem]);
    }
    for (const e of entries) {
      const now = problems.get(e.record.name);
      const before = new Set((e.nicProblems ?? []).map((p) => `${p.tap} ${p.problem}`));
      for (const p of now ?? []) {
        if (before.has(`${p.tap} ${p.problem}`)) continue;
        this.host.logger.warn({ vm: e.record.name, tap: p.tap, bridge: p.bridge, problem: p.problem }, `${e.record.name}: ${p.message}; fix: ${p.fix}`);
        this.host.emit({ type: 'vm-network', vm: e.record.name, message: `${p.message}; fix: ${p.fix}` });
      }
      if (now === undefined) delete e.nicProblems;
      else e.nicProblems = now;
    }
  }

  /** Puts one TAP back; undefined when done, else why not. */
  private async attach(d: TapDecision, reason: string): Promise<string | undefined> {
    try {
      await this.host.net.attachTap(d.tap, d.bridge);
    } catch (error) {
      return (error as Error).message;
    }
    const message = `TAP ${d.tap} of nics[${d.nic}] was ${d.why ?? 'off its bridge'}: put back on bridge ${d.bridge} and up (${reason})`;
    this.host.logger.info({ vm: d.vm, tap: d.tap, bridge: d.bridge }, `${d.vm}: ${message}`);
    this.host.emit({ type: 'vm-network', vm: d.vm, message });
    return undefined;
  }
}
