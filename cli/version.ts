import { readFileSync } from 'node:fs';

/**
 * vmkeep's version, from package.json: one level up from cli/, two from dist/cli/ and
 * dist/bundle/, three from a bundle's chunks (dist/bundle/vmkeep-chunks/).
 */
function readVersion(): string {
  for (const rel of ['../package.json', '../../package.json', '../../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(rel, import.meta.url), 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'vmkeep' && pkg.version) return pkg.version;
    } catch {
      // not at this level
    }
  }
  return 'unknown';
}

export const VERSION = readVersion();
