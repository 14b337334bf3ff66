// Each running VM listed by systemd-machined under its name, as the QEMU its record names
// (ARCHITECTURE.md, "daemon/"). The record is the truth: after every change of it,
// and after each reattach (machined may have lost its list while vmkeepd was away), machined's
// entry is made to match. machined being absent is no error: said once, not tried again until
// the next vmkeepd start, VMs run as usual.
import { machineNameProblem } from '../launcher/index.js';
import { MACHINE_SERVICE, ScopeError, type MachineToRegister, type RegisteredMachine } from '../scope-manager/index.js';
import type { Logger } from './log.js';
import type { MachinePort } from './ports.js';
import type { VmRecord } from './records.js';

/** States in which the recorded QEMU is in its scope and holds the guest. */
const LISTED_STATES: ReadonlySet<string> = new Set(['running', 'paused', 'shutdown']);
/** States that say nothing certain about the QEMU (not in its scope yet, or not verified): left as listed. */
const UNSETTLED_STATES: ReadonlySet<string> = new Set(['starting', 'unreachable']);

/** The machine a record asks for; null: none; undefined: no opinion while the VM is unsettled. */
export function machineOf(record: VmRecord): MachineToRegister | null | undefined {
  if (UNSETTLED_STATES.has(record.state)) return undefined;
  const proc = record.process;
  if (proc === undefined || proc.scope === null || !LISTED_STATES.has(record.state)) return null;
  return { name: record.name, uuid: record.uuid, leader: proc.pid };
}

export type MachineStep = 'keep' | 'register' | 'replace' | 'unregister' | 'foreign';

/** What makes machined list `wanted` (pure). A machine another service registered is never touched. */
export function planMachine(wanted: MachineToRegister | null, listed: RegisteredMachine | null): MachineStep {
  if (listed !== null && listed.service !== MACHINE_SERVICE) return 'foreign';
  if (wanted === null) return listed === null ? 'keep' : 'unregister';
  if (listed === null) return 'register';
  // A migration's new QEMU: unregistered first, machined refuses a second machine of a name.
  return listed.leader === wanted.leader ? 'keep' : 'replace';
}

/** Brings machined in line with records, one VM at a time, the latest record winning. Never throws. */
export class MachineSync {
  private readonly latest = new Map<string, VmRecord>();
  private readonly dirty = new Set<string>();
  private readonly running = new Map<string, Promise<void>>();
  private readonly saidOnce = new Set<string>();
  private absent = false;
  private closed = false;

  constructor(
    private readonly port: MachinePort,
    private readonly logger: Logger,
  ) {}

  sync(record: VmRecord): void {
    if (this.closed) return;
    const name = record.name;
    this.latest.set(name, record);
    this.dirty.add(name);
    if (this.running.has(name)) return;
    const loop = (async () => {
      while (!this.closed && this.dirty.delete(name)) await this.apply(this.latest.get(name) as VmRecord);
    })().finally(() => this.running.delete(name));
    this.running.set(name, loop);
  }

  /** Settles once every sync asked so far is done. */
  async idle(): Promise<void> {
    while (this.running.size > 0) await Promise.all(this.running.values());
  }

  /** A closed daemon changes nothing any more: the next one owns the list. */
  close(): void {
    this.closed = true;
  }

  private async apply(record: VmRecord): Promise<void> {
    const wanted = machineOf(record);
    if (wanted === undefined) return;
    const name = record.name;
    const problem = machineNameProblem(name);
    if (problem !== undefined) {
      this.once(`name:${name}`, () => this.logger.info({ vm: name }, `${name} is not listed by systemd-machined: it takes host names only, and "${name}" ${problem}`));
      return;
    }
    // Absent once, absent for this daemon's life: a host that installs machined later has it
    // used from vmkeepd's next start (each try would cost a bus activation attempt).
    if (this.absent) return;
    try {
      const listed = await this.port.lookup(name);
      const step = planMachine(wanted, listed);
      if (this.closed) return;
      if (step === 'foreign') {
        if (wanted !== null) this.once(`foreign:${name}`, () => this.logger.warn({ vm: name }, `systemd-machined lists another service's machine named ${name}; ${name} is not registered (machinectl shows the other one)`));
        return;
      }
      if (step === 'unregister' || step === 'replace') await this.port.unregister(name);
      if ((step === 'register' || step === 'replace') && wanted !== null) {
        await this.port.register(wanted);
        this.logger.info({ vm: name, pid: wanted.leader }, `${name} registered with systemd-machined (pid ${wanted.leader})`);
      }
    } catch (error) {
      if (this.closed) return;
      if (error instanceof ScopeError && error.code === 'NO_MACHINED') {
        this.absent = true;
        this.once('absent', () => this.logger.info({ err: error }, error.message));
        return;
      }
      this.logger.warn({ vm: name, err: error }, `could not bring ${name}'s systemd-machined entry up to date (${(error as Error).message}); tried again at its next change or vmkeepd start`);
    }
  }

  private once(key: string, say: () => void): void {
    if (this.saidOnce.has(key)) return;
    this.saidOnce.add(key);
    say();
  }
}
