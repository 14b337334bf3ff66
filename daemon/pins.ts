// Pinned module folders (one copy per QEMU build, so a stale QEMU keeps loading its own
// modules): pinned at each launch, collected when no VM uses them, never both at once.
import type { Installation, InstallationInfo } from '../launcher/index.js';
import { collectPinnedModules, pinModuleDir } from '../upgrade/index.js';
import type { VmRecord } from './records.js';

export class ModulePins {
  /** Launches under way: folders are collected only when none are. */
  private launching = 0;
  private lock: Promise<void> = Promise.resolve();

  constructor(private readonly pinRoot: string, private readonly log: { info(o: object, m: string): void; warn(o: object, m: string): void }) {}

  /** Runs a launch with the installation's module folder pinned; collection waits for it. */
  async whileLaunching<T>(installation: Installation, info: InstallationInfo, launch: (pinned: Installation) => Promise<T>): Promise<T> {
    this.launching++;
    try {
      await this.lock;
      return await launch(await pinModuleDir(installation, info, this.pinRoot));
    } finally {
      this.launching--;
    }
  }

  /** Removes pinned folders no VM uses; skipped while a launch or a migration is under way. */
  collect(current: () => { records: readonly VmRecord[]; damagedRecords: number }): Promise<void> {
    this.lock = this.lock.then(async () => {
      const { records, damagedRecords } = current();
      // A damaged record may name a running QEMU whose folder we cannot see: keep everything.
      if (this.launching > 0 || damagedRecords > 0 || records.some((r) => r.refresh?.strategy === 'migrate' || r.refresh?.strategy === 'cpr')) return;
      const inUse = new Set(records
        .flatMap((r) => [r.process ? r.binary?.moduleDir : undefined, r.retired?.moduleDir])
        .filter((d): d is string => d !== undefined));
      const removed = await collectPinnedModules(this.pinRoot, inUse);
      if (removed.length > 0) this.log.info({ removed }, `removed ${removed.length} pinned module folder(s) no VM uses`);
    }).catch((error: unknown) => {
      this.log.warn({ err: error }, 'could not collect pinned module folders');
    });
    return this.lock;
  }
}
