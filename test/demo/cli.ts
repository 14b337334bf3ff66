// The demos' way of running the vmkeep CLI so a reader sees what a person would type and get.
import { execa } from 'execa';
import { join } from 'node:path';
import { projectRoot } from '../support/paths.js';

const CLI = join(projectRoot(), 'dist', 'cli', 'main.js');

/**
 * Runs `vmkeep ARGS --socket SOCKET`, prints the command line and then its output with stdout
 * and stderr interleaved in the order they were written (as on a terminal); resolves with stdout.
 */
export async function showVmkeep(socket: string, ...args: string[]): Promise<string> {
  const result = await execa(process.execPath, [CLI, ...args, '--socket', socket], { reject: false, all: true });
  process.stdout.write(`$ vmkeep ${args.join(' ')}\n${result.all ? `${result.all}\n` : ''}`);
  if (result.exitCode !== 0) throw new Error(`vmkeep ${args.join(' ')} exited ${result.exitCode}`);
  return result.stdout;
}
