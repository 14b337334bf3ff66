import { statSync } from 'node:fs';

/**
 * The URL of a program's bundle (dist/bundle/NAME.js, made by `npm run build`: one file to load
 * instead of dozens of modules) when it is there and not older than the loader `from` (tsc
 * rewrites the loaders at each build, so a bundle left from an older build is never run);
 * else the compiled module `fallback` next to the loader.
 */
export function programUrl(from: string, name: string, fallback: string): string {
  const bundle = new URL(`../bundle/${name}.js`, from);
  try {
    if (statSync(bundle).mtimeMs >= statSync(new URL(from)).mtimeMs) return bundle.href;
  } catch {
    // no bundle: the modules
  }
  return new URL(fallback, from).href;
}
