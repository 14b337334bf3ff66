export type UpgradeErrorCode =
  | 'BAD_CONFIG'
  | 'NO_INSTALLATION'
  | 'BAD_VERSION'
  | 'OLDER_TARGET'
  | 'MACHINE_TYPE_MISSING'
  | 'PIN_FAILED'
  | 'MIGRATION_FAILED'
  | 'MIGRATION_TIMEOUT'
  | 'BAD_STRATEGY'
  | 'CPR_UNAVAILABLE';

/** Every failure of the upgrade component: a code to branch on, a message that says the fix. */
export class UpgradeError extends Error {
  readonly code: UpgradeErrorCode;

  constructor(code: UpgradeErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'UpgradeError';
    this.code = code;
  }
}
