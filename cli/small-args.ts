// A parser for a flat option table (cli/options.ts), for vmkeepd: it has no subcommands and is
// started by systemd at every restart, so it skips yargs and its layout machinery. It accepts
// what yargs accepts for the same table: --name value, --name=value, --no-flag, --flag=false,
// repeated array options, camelCase spellings, and VMKEEP_* variables below the command line.
import { CliError } from './errors.js';
import type { OptionSpec, OptionTable } from './options.js';

export type ParsedValue = string | boolean | string[];

export interface Parsed {
  /** camelCase option name to value; options without value or default are absent. */
  values: Record<string, ParsedValue>;
  help: boolean;
}

const toKebab = (name: string): string => name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`);
const toCamel = (name: string): string => name.replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const envName = (prefix: string, name: string): string => `${prefix}_${name.toUpperCase().replaceAll('-', '_')}`;

function parseBoolean(name: string, text: string): boolean {
  if (text === 'true' || text === '') return true;
  if (text === 'false') return false;
  throw new CliError('USAGE', `--${name} takes true or false, not "${text}"`);
}

/** Parses argv against the table; throws CliError USAGE for anything yargs' strict mode refuses. */
export function parseOptions(table: OptionTable, argv: readonly string[], env: NodeJS.ProcessEnv, envPrefix: string): Parsed {
  const given = new Map<string, ParsedValue>();
  let help = false;
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (arg === '--help' || arg === '-h') {
      help = true;
      continue;
    }
    if (!arg.startsWith('--') || arg === '--') throw new CliError('USAGE', `Unknown argument: ${arg}`);
    const eq = arg.indexOf('=');
    let name = toKebab(arg.slice(2, eq < 0 ? undefined : eq));
    let inline = eq < 0 ? undefined : arg.slice(eq + 1);
    let spec: OptionSpec | undefined = table[name];
    if (spec === undefined && name.startsWith('no-') && table[name.slice(3)]?.type === 'boolean' && inline === undefined) {
      name = name.slice(3);
      spec = table[name];
      inline = 'false';
    }
    if (spec === undefined) throw new CliError('USAGE', `Unknown argument: ${arg.slice(2, eq < 0 ? undefined : eq)}`);
    if (spec.type === 'boolean') {
      // yargs also takes the value as the next word: --scope false.
      if (inline === undefined && (argv[i + 1] === 'true' || argv[i + 1] === 'false')) inline = argv[++i];
      given.set(name, parseBoolean(name, inline ?? 'true'));
      continue;
    }
    if (inline === undefined) {
      const next = argv[i + 1];
      if (next === undefined || next.startsWith('--')) throw new CliError('USAGE', `Not enough arguments following: ${name}`);
      inline = next;
      i++;
    }
    if (spec.array) given.set(name, [...((given.get(name) as string[] | undefined) ?? []), inline]);
    else given.set(name, inline);
  }

  const values: Record<string, ParsedValue> = {};
  for (const [name, spec] of Object.entries(table)) {
    let value = given.get(name);
    const fromEnv = env[envName(envPrefix, name)];
    if (value === undefined && fromEnv !== undefined) {
      value = spec.type === 'boolean' ? parseBoolean(name, fromEnv) : spec.array ? [fromEnv] : fromEnv;
    }
    value ??= spec.default;
    if (value === undefined) continue;
    if (spec.choices && typeof value === 'string' && !spec.choices.includes(value)) {
      throw new CliError('USAGE', `Invalid values:\n  Argument: ${name}, Given: "${value}", Choices: ${spec.choices.map((c) => `"${c}"`).join(', ')}`);
    }
    values[toCamel(name)] = value;
  }
  return { values, help };
}

/** A plain help text from the table: one line per visible option. */
export function formatOptionsHelp(usage: string, table: OptionTable): string {
  const lines = [usage, '', 'Options:'];
  for (const [name, spec] of Object.entries(table)) {
    if (spec.hidden) continue;
    const flag = spec.type === 'boolean' && spec.default === true ? `--[no-]${name}` : `--${name}`;
    const shown = spec.defaultDescription ?? (spec.default === undefined ? undefined : JSON.stringify(spec.default));
    const extras = [
      spec.choices ? `choices: ${spec.choices.join(', ')}` : undefined,
      shown === undefined ? undefined : `default: ${shown}`,
    ].filter(Boolean);
    lines.push(`  ${flag}`, `      ${spec.describe}${extras.length > 0 ? ` [${extras.join('; ')}]` : ''}`);
  }
  lines.push('  -h, --help', '      show this help');
  return `${lines.join('\n')}\n`;
}
