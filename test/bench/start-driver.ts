// Benchmark 4's inside half: runs INSIDE a private systemd (scope PIDs must be those of its pid
// namespace). Compiled to dist/test/bench/start-driver.js; `node start-driver.js '<json>'`.
// Times launchVm of a paused VM to QMP ready, alternately without and with placeInScope, and
// prints one JSON line: {"ok":true,"result":{withoutMs,withMs}} or {"ok":false,"error":"..."}.
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  isSameProcess, launchVm, probeInstallation, validateSpec, waitForProcessExit, type Installation, type LaunchedVm,
} from '../../launcher/index.js';
import { ScopeManager } from '../../scope-manager/index.js';

interface Input {
  qemu: string;
  kernel: string;
  initrd: string;
  append: string;
  workDir: string;
  pairs: number;
}

const started: LaunchedVm[] = [];

async function main(): Promise<void> {
  const input = JSON.parse(process.argv[2] ?? '') as Input;
  const installation: Installation = { name: 'default', binary: input.qemu, firmwareDirs: [] };
  const info = await probeInstallation(installation, { cacheDir: join(input.workDir, 'cache') });
  const spec = validateSpec({ name: 'bench-start', kernel: input.kernel, initrd: input.initrd, append: input.append });
  const manager = new ScopeManager();
  let seq = 0;

  /** One start to QMP ready; the VM is quit (it never ran guest code) and its scope awaited gone. */
  const once = async (inScope: boolean): Promise<number> => {
    const n = seq++;
    const scope = `vmkeep-bench-start-${process.pid}-${n}.scope`;
    const base = join(input.workDir, `start-${n}`);
    const t0 = performance.now();
    const vm = await launchVm({
      spec,
      uuid: randomUUID(),
      installation,
      info,
      stayPaused: true,
      paths: { qmpSocket: `${base}.sock`, serialLog: `${base}.serial`, stderrLog: `${base}.log` },
      ...(inScope ? { placeInScope: async (pid: number) => void (await manager.createScope({ name: scope, pids: [pid] })) } : {}),
    });
    const elapsed = performance.now() - t0;
    started.push(vm);
    try {
      // A sample only counts if it measured what it claims: QEMU really is in the scope (or not).
      const cgroup = await readFile(`/proc/${vm.pid}/cgroup`, 'utf8');
      if (cgroup.includes(scope) !== inScope) throw new Error(`QEMU pid ${vm.pid} is in the wrong cgroup: ${cgroup.trim()}`);
      await vm.qmp.quit();
      await waitForProcessExit(vm.pid, vm.startTime, 10_000);
    } finally {
      vm.qmp.close();
    }
    if (inScope && !(await manager.waitScopeGone(scope, 10_000))) throw new Error(`${scope} still exists 10 s after its QEMU quit`);
    return elapsed;
  };

  const withoutMs: number[] = [];
  const withMs: number[] = [];
  try {
    // Untimed: the D-Bus connection, the page cache, the probe cache.
    await manager.listScopes();
    await once(false);
    await once(true);
    for (let i = 0; i < input.pairs; i++) {
      withoutMs.push(await once(false));
      withMs.push(await once(true));
    }
  } finally {
    manager.close();
  }
  process.stdout.write(`${JSON.stringify({ ok: true, result: { withoutMs, withMs, qemuVersion: info.version } })}\n`);
}

main().catch((error: unknown) => {
  // Paused QEMUs never ran guest code: a hard kill on failure loses nothing.
  for (const vm of started) if (isSameProcess(vm.pid, vm.startTime)) process.kill(vm.pid, 'SIGKILL');
  process.stdout.write(`${JSON.stringify({ ok: false, error: error instanceof Error ? (error.stack ?? error.message) : String(error) })}\n`);
  process.exitCode = 1;
});
