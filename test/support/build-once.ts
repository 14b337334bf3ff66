// Vitest global set-up of the integration project: integration tests run vmkeep's compiled
// programs (the CLI, drivers inside the private systemd), so build once before any of them:
// tsc, then the bundles the bin entries run (scripts/bundle.mjs), as `npm run build` does.
import { execa } from 'execa';
import { projectRoot } from './paths.js';

const ROOT = projectRoot();

export default async function buildOnce(): Promise<void> {
  const result = await execa('npm', ['run', '--silent', 'build'], { cwd: ROOT, reject: false, all: true });
  if (result.exitCode !== 0) throw new Error(`npm run build failed, integration tests need the build:\n${result.all}`);
}
