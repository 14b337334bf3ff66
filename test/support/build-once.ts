// Vitest global set-up of the integration project: integration tests run vmkeep's compiled
// programs (the CLI, drivers inside the private systemd), so compile once before any of them.
import { execa } from 'execa';
import { projectRoot } from './paths.js';

const ROOT = projectRoot();

export default async function buildOnce(): Promise<void> {
  const result = await execa('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: ROOT, reject: false, all: true });
  if (result.exitCode !== 0) throw new Error(`npx tsc failed, integration tests need the build:\n${result.all}`);
}
