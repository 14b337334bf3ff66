export type CliErrorCode = 'SPEC_UNREADABLE' | 'SPEC_NOT_JSON' | 'RUN_FAILED' | 'USAGE';

export class CliError extends Error {
  readonly code: CliErrorCode;

  constructor(code: CliErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CliError';
    this.code = code;
  }
}
