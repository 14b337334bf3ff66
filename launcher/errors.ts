export type LaunchErrorCode =
  | 'INVALID_SPEC'
  | 'UNKNOWN_MACHINE'
  | 'FILE_NOT_FOUND'
  /** A file passed to QEMU is not the one recorded (replaced or moved since). */
  | 'FILE_CHANGED'
  /** A disk's backing chain differs from the recorded one: an operator checks and accepts it. */
  | 'BACKING_CHAIN_CHANGED'
  /** A disk image vmkeep will not hand to QEMU (a backing file without a stated format, ...). */
  | 'DISK_REFUSED'
  | 'PROBE_FAILED'
  | 'QEMU_EXITED'
  | 'SPAWN_FAILED'
  | 'SCOPE_FAILED'
  | 'TIMEOUT';

/** One thing wrong with a VM spec: `field` is a path like `disks[1].format`. */
export interface SpecProblem {
  field: string;
  message: string;
  fix: string;
}

export class LaunchError extends Error {
  readonly code: LaunchErrorCode;
  /** Every problem found in a spec (INVALID_SPEC only; empty otherwise). */
  readonly problems: readonly SpecProblem[];

  constructor(
    code: LaunchErrorCode,
    message: string,
    options?: { cause?: unknown; problems?: readonly SpecProblem[] },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'LaunchError';
    this.code = code;
    this.problems = options?.problems ?? [];
  }
}
