import type { Writable } from 'node:stream';

/**
 * Where a command's words go. Humans get short lines on stderr (so stdout stays the guest's
 * console); machines (`--json`) get one JSON object per line on stdout.
 */
export interface Reporter {
  /** A step of a long operation ("probing QEMU…"). */
  progress(message: string, fields?: Record<string, unknown>): void;
  /** Something the user should know that is not an error. */
  notice(message: string, fields?: Record<string, unknown>): void;
  /** A line of the guest's serial console. */
  console(line: string): void;
  /** A failure, with its code and the fix when known. */
  failure(code: string, message: string): void;
  /** The final result. */
  result(fields: Record<string, unknown>, human: string): void;
}

export function createReporter(json: boolean, stdout: Writable, stderr: Writable): Reporter {
  if (json) {
    const emit = (type: string, fields: Record<string, unknown>): void => {
      stdout.write(`${JSON.stringify({ type, time: new Date().toISOString(), ...fields })}\n`);
    };
    return {
      progress: (message, fields) => emit('progress', { message, ...fields }),
      notice: (message, fields) => emit('notice', { message, ...fields }),
      console: (line) => emit('console', { line }),
      failure: (code, message) => emit('error', { code, message }),
      result: (fields) => emit('result', fields),
    };
  }
  return {
    progress: (message) => stderr.write(`vmkeep: ${message}\n`),
    notice: (message) => stderr.write(`vmkeep: ${message}\n`),
    console: (line) => stdout.write(`${line}\n`),
    failure: (code, message) => stderr.write(`vmkeep: error [${code}]: ${message}\n`),
    result: (_fields, human) => stderr.write(`vmkeep: ${human}\n`),
  };
}
