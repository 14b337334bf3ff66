// Commands answered without yargs: `vmkeep list` is what scripts and people run most, and
// yargs' start-up (its layout code, the help it prepares for every command) costs more than
// the answer. Only a command line this small parser takes completely is answered here; any
// other (help, a typo, an option placed before the command) goes to the full parser, which
// reports it as before.
import type { CliIo } from './app.js';
import { CliError } from './errors.js';
import { JSON_OPTION, socketOption } from './options.js';
import { parseOptions } from './small-args.js';
import { commandRunner, listVms } from './vm-commands.js';

/** The exit code, or undefined when the full command line parser must handle `argv`. */
export async function runQuick(argv: readonly string[], io: CliIo): Promise<number | undefined> {
  const [command, ...rest] = argv;
  if (command !== 'list' && command !== 'ls') return undefined;
  let values: Record<string, unknown>;
  try {
    const parsed = parseOptions({ json: JSON_OPTION, socket: socketOption(io.env) }, rest, io.env, 'VMKEEP');
    if (parsed.help) return undefined;
    values = parsed.values;
  } catch (error) {
    if (error instanceof CliError) return undefined;
    throw error;
  }
  let exitCode = 0;
  const run = commandRunner({ io, setExitCode: (code) => (exitCode = code) });
  await run((api, out) => listVms(api, out, io))({ json: values['json'] === true, socket: String(values['socket']) });
  return exitCode;
}
