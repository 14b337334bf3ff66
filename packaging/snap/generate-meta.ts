// node dist/packaging/snap/generate-meta.js SNAPCRAFT_YAML PRIME [--version V]
// Writes PRIME/meta/snap.yaml, copies the launcher part's files into PRIME and prints the qemu
// part's packages and stage exclusions (one per line: "package NAME", "exclude PATH") for
// packaging/snap/build.sh. Exits 2 with the reason when snapcraft.yaml has a key it does not know.
import { chmod, copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { planSnapBuild, SnapMetaError } from './meta.js';

async function main(argv: string[]): Promise<void> {
  const [yamlPath, prime, flag, version] = argv;
  if (yamlPath === undefined || prime === undefined || (flag !== undefined && (flag !== '--version' || version === undefined))) {
    throw new SnapMetaError('usage: generate-meta.js SNAPCRAFT_YAML PRIME [--version V]');
  }
  const plan = planSnapBuild(await readFile(yamlPath, 'utf8'), version === undefined ? {} : { version });
  await mkdir(join(prime, 'meta'), { recursive: true });
  await writeFile(join(prime, 'meta', 'snap.yaml'), plan.snapYaml);
  // snapcraft.yaml sits in snap/; a part's `source` is relative to the project folder above it.
  const project = resolve(dirname(yamlPath), '..');
  for (const { from, to } of plan.launcher.files) {
    await mkdir(dirname(join(prime, to)), { recursive: true });
    await copyFile(join(project, plan.launcher.source, from), join(prime, to));
    await chmod(join(prime, to), 0o755);
  }
  const lines = [...plan.qemu.packages.map((p) => `package ${p}`), ...plan.qemu.exclude.map((e) => `exclude ${e}`)];
  process.stdout.write(lines.join('\n') + '\n');
}

main(process.argv.slice(2)).catch((err: unknown) => {
  process.stderr.write(`generate-meta: ${err instanceof Error ? err.message : String(err)}\n`);
  process.exit(err instanceof SnapMetaError ? 2 : 1);
});
