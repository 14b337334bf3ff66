export type CliErrorCode = 'SPEC_UNREADABLE' | 'SPEC_NOT_JSON' | 'RUN_FAILED' | 'USAGE';

export class CliError extends Error {
  readonly code: CliErrorCode;

  constructor(code: CliErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CliError';
    this.code = code;
  }
}

/** Prints an error as `code + message`; an error without a code is a bug and says so. */
export function reportError(error: unknown, failure: (code: string, message: string) => void): void {
  const code = error instanceof Error ? (error as Error & { code?: unknown }).code : undefined;
  if (error instanceof Error && typeof code === 'string') {
    failure(code, error.message);
  } else {
    failure('INTERNAL', `unexpected error (please report it): ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  }
}
