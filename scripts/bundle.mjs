// Bundles each program (vmkeep, vmkeepd) with esbuild into dist/bundle/: the program, vmkeep's
// modules and its dependencies (yargs, dbus-next, semver, execa) in one file per entry point,
// with what only some commands need (the daemon's runtime, `vmkeep run`, execa) split into
// chunks loaded on demand. Node 20 has no compile cache for ES modules, so loading a few files
// instead of dozens of modules saves much of the start-up time. dist/cli/main.js and dist/cli/vmkeepd.js
// (the bin entries) run the bundle when it is there; the compiled modules stay the fallback.
// Run by `npm run build` after tsc; a packager runs the same (esbuild is a devDependency).
import { build } from 'esbuild';
import { rm } from 'node:fs/promises';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('..', import.meta.url));
const outdir = `${root}dist/bundle`;

await rm(outdir, { recursive: true, force: true });
// One build per program: chunks shared between the two would split each program's start-up
// over more files.
for (const [name, entry] of Object.entries({ vmkeep: 'cli/vmkeep-program.ts', vmkeepd: 'cli/vmkeepd-program.ts' })) {
await build({
  absWorkingDir: root,
  entryPoints: { [name]: entry },
  outdir,
  bundle: true,
  splitting: true,
  format: 'esm',
  platform: 'node',
  target: 'node20',
  chunkNames: `${name}-chunks/[name]-[hash]`,
  sourcemap: 'linked',
  // Optional transports and X11 address lookup of dbus-next, never reached with an explicit bus address.
  external: ['usocket', 'event-stream', 'x11'],
  // CommonJS dependencies call require() for Node's own modules.
  banner: { js: "import { createRequire as __vmkeepRequire } from 'node:module'; const require = __vmkeepRequire(import.meta.url);" },
  logLevel: 'warning',
});
}
