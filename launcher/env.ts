const DEFAULT_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

/**
 * The environment a QEMU (or a probe of one) runs with: a minimal base plus `extra`.
 * Nothing else is inherited from the daemon, so a stray QEMU_MODULE_DIR (or any other
 * variable QEMU reads) in the daemon's environment never changes what a VM loads.
 */
export function qemuEnvironment(
  extra: Readonly<Record<string, string>>,
  base: NodeJS.ProcessEnv = process.env,
): Record<string, string> {
  const env: Record<string, string> = { PATH: base.PATH ?? DEFAULT_PATH };
  if (base.TMPDIR !== undefined) env.TMPDIR = base.TMPDIR;
  return { ...env, ...extra };
}
