import { randomUUID } from 'node:crypto';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  validateSpecAndFiles,
  nicsForForegroundRun,
  launchVm,
  probeInstallation,
  waitForProcessExit,
  LaunchError,
  QUIT_EXIT_TIMEOUT_MS,
  type Installation,
  type LaunchedVm,
} from '../launcher/index.js';
import { ACPI_REPEAT_MS, powerDownGuest, QMP_EVENT, shutdownData, type ShutdownData } from '../qmp/index.js';
import { CliError } from './errors.js';
import { EXIT_CLEAN, EXIT_FAILED, EXIT_FORCED, EXIT_POWEROFF_TIMEOUT } from './exit-codes.js';
import { followFile } from './follow.js';
import type { Reporter } from './output.js';

export interface RunOptions {
  specPath: string;
  installation: Installation;
  cacheDir: string;
  /** Seconds the guest gets to power off after the first Ctrl-C. */
  timeoutSec: number;
  /** Keep the VM's files here instead of a temporary folder that is removed at the end. */
  stateDir?: string;
}

/** What the run command needs from the process: its signals, swappable in tests. */
export interface RunContext {
  reporter: Reporter;
  onSignal(listener: (signal: NodeJS.Signals) => void): () => void;
}

export { EXIT_CLEAN, EXIT_FAILED, EXIT_FORCED, EXIT_POWEROFF_TIMEOUT } from './exit-codes.js';

/** Reads a spec file as JSON, unvalidated (the daemon validates what `vmkeep create` sends). */
export async function readSpecJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (cause) {
    throw new CliError('SPEC_UNREADABLE', `cannot read spec file ${path}: ${(cause as Error).message}`, { cause });
  }
  try {
    return JSON.parse(text);
  } catch (cause) {
    throw new CliError(
      'SPEC_NOT_JSON',
      `spec file ${path} is not valid JSON (${(cause as Error).message}); fix the file, e.g. check it with: node -e 'JSON.parse(require("fs").readFileSync("${path}","utf8"))'`,
      { cause },
    );
  }
}

/** Reads and validates a spec file; every problem is reported with its field and fix. */
async function loadSpecFile(path: string) {
  return nicsForForegroundRun(await validateSpecAndFiles(await readSpecJson(path)));
}

/**
 * `vmkeep run`: one VM as a child of this command, with its console on stdout. It ends when
 * the guest powers off; the first signal asks the guest to power off (ACPI), the second quits
 * QEMU at once. Resolves to the exit code.
 */
export async function runVm(options: RunOptions, ctx: RunContext): Promise<number> {
  const { reporter } = ctx;
  // Listening from the first moment: without a listener, Node ends the process on SIGINT and
  // a QEMU that is starting in its own session would be left behind unmanaged.
  // It stays until the end, so a signal during the tear-down cannot kill us half-way either.
  let starting = true;
  let interrupted: NodeJS.Signals | undefined;
  const offSignal = ctx.onSignal((signal) => {
    if (!starting || interrupted !== undefined) return;
    reporter.notice(`${signal} while starting: the VM will be quit as soon as its start returns`);
    interrupted = signal;
  });
  try {
    return await startAndSupervise(options, ctx, () => {
      starting = false;
      return interrupted;
    });
  } finally {
    offSignal();
  }
}

async function startAndSupervise(
  options: RunOptions,
  outer: RunContext,
  endEarlySignals: () => NodeJS.Signals | undefined,
): Promise<number> {
  // The result (or failure) is the last line: it waits until the console follower has printed
  // everything the guest wrote (QEMU is gone by then) and stopped.
  const deferred: Array<() => void> = [];
  const reporter: Reporter = {
    ...outer.reporter,
    progress: (message, fields) => outer.reporter.progress(message, fields),
    notice: (message, fields) => outer.reporter.notice(message, fields),
    console: (line) => outer.reporter.console(line),
    failure: (code, message) => void deferred.push(() => outer.reporter.failure(code, message)),
    result: (fields, human) => void deferred.push(() => outer.reporter.result(fields, human)),
  };
  const ctx: RunContext = { reporter, onSignal: (listener) => outer.onSignal(listener) };
  try {
    return await startAndSuperviseWith(options, ctx, endEarlySignals);
  } finally {
    for (const report of deferred) report();
  }
}

async function startAndSuperviseWith(
  options: RunOptions,
  ctx: RunContext,
  endEarlySignals: () => NodeJS.Signals | undefined,
): Promise<number> {
  const { reporter } = ctx;
  const spec = await loadSpecFile(options.specPath);

  reporter.progress(`probing ${options.installation.binary}`);
  const info = await probeInstallation(options.installation, { cacheDir: options.cacheDir });

  const ownStateDir = options.stateDir === undefined;
  const stateDir = options.stateDir ?? (await mkdtemp(join(tmpdir(), `vmkeep-run-${spec.name}-`)));
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const paths = {
    qmpSocket: join(stateDir, 'qmp.sock'),
    serialLog: join(stateDir, 'serial.log'),
    stderrLog: join(stateDir, 'qemu.log'),
  };
  // The console is followed from its first byte; QEMU opens the same file when it starts.
  await writeFile(paths.serialLog, '');
  const follower = await followFile(paths.serialLog, (line) => reporter.console(line));

  let vm: LaunchedVm | undefined;
  try {
    const startedAt = performance.now();
    reporter.progress(`starting ${spec.name} on QEMU ${info.version}`);
    vm = await launchVm({
      spec,
      uuid: spec.uuid ?? randomUUID(),
      installation: options.installation,
      info,
      paths,
    });
    const interrupted = endEarlySignals();
    if (interrupted !== undefined) {
      await vm.qmp.quit();
      reporter.result({ vm: spec.name, outcome: 'interrupted', signal: interrupted }, `${spec.name}: start interrupted by ${interrupted}; QEMU quit`);
      return EXIT_FORCED;
    }
    reporter.notice(
      `${spec.name} running: pid ${vm.pid}, machine ${vm.machineType}, ready in ${Math.round(performance.now() - startedAt)} ms; Ctrl-C powers the guest off`,
      { vm: spec.name, pid: vm.pid, machineType: vm.machineType, stateDir },
    );
    return await superviseUntilEnd(vm, options, ctx);
  } catch (error) {
    if (vm !== undefined) await vm.qmp.quit().catch(() => undefined);
    throw error;
  } finally {
    if (vm !== undefined) {
      await waitForProcessExit(vm.pid, vm.startTime, QUIT_EXIT_TIMEOUT_MS).catch((error: unknown) => {
        reporter.notice(`QEMU pid ${vm!.pid} did not exit: ${(error as Error).message}`);
      });
      vm.qmp.close();
    }
    await follower.stop();
    if (ownStateDir) await rm(stateDir, { recursive: true, force: true });
  }
}

type Ending =
  | { kind: 'guest-shutdown'; shutdown: ShutdownData }
  | { kind: 'qemu-gone'; reason: string }
  | { kind: 'timeout' }
  | { kind: 'forced' };

function assertNever(value: never): never {
  throw new Error(`unhandled case ${JSON.stringify(value)}`);
}

async function superviseUntilEnd(vm: LaunchedVm, options: RunOptions, ctx: RunContext): Promise<number> {
  const { reporter } = ctx;
  let signals = 0;
  // Once an ending is decided, a late failure of the power-off wait is no news.
  let over = false;
  let finish!: (ending: Ending) => void;
  const ended = new Promise<Ending>((resolve) => (finish = resolve));

  const offEvent = vm.qmp.on('event', (event) => {
    if (event.event === QMP_EVENT.SHUTDOWN) finish({ kind: 'guest-shutdown', shutdown: shutdownData(event) });
  });
  const offClose = vm.qmp.on('close', (reason) => finish({ kind: 'qemu-gone', reason: reason.message }));
  const offSignal = ctx.onSignal((signal) => {
    signals += 1;
    if (signals === 1) {
      reporter.notice(
        `${signal}: asking the guest to power off (ACPI, pressed again every ${ACPI_REPEAT_MS / 1000} s until it acts), waiting up to ${options.timeoutSec} s; repeat to stop QEMU at once`,
      );
      powerDownGuest(vm.qmp, {
        timeoutMs: options.timeoutSec * 1000,
        onPress: (press) => {
          if (press > 1) reporter.notice(`pressed the power button again (${press}): the guest has not acted yet (still booting?)`);
        },
      }).catch((error: unknown) => {
        if (over) return;
        reporter.notice((error as Error).message);
        finish({ kind: 'timeout' });
      });
    } else {
      finish({ kind: 'forced' });
    }
  });

  try {
    const ending = await ended;
    over = true;
    switch (ending.kind) {
      case 'guest-shutdown': {
        const data = ending.shutdown;
        await vm.qmp.quit();
        const clean = data.guest;
        reporter.result(
          { vm: vm.spec.name, outcome: clean ? 'powered-off' : 'shutdown', reason: data.reason },
          clean ? `${vm.spec.name}: guest powered off cleanly` : `${vm.spec.name}: shut down by the host (${data.reason})`,
        );
        return clean ? EXIT_CLEAN : EXIT_FAILED;
      }
      case 'timeout':
        await vm.qmp.quit();
        reporter.failure(
          'POWEROFF_TIMEOUT',
          `the guest did not power off within ${options.timeoutSec} s (does it handle ACPI power-button events?); QEMU was quit. Give it longer with --timeout`,
        );
        return EXIT_POWEROFF_TIMEOUT;
      case 'forced':
        await vm.qmp.quit();
        reporter.result({ vm: vm.spec.name, outcome: 'quit' }, `${vm.spec.name}: QEMU quit without waiting for the guest`);
        return EXIT_FORCED;
      case 'qemu-gone':
        reporter.failure('QEMU_GONE', `QEMU exited unexpectedly (${ending.reason}); see its log for the cause`);
        return EXIT_FAILED;
      default:
        return assertNever(ending);
    }
  } catch (error) {
    if (error instanceof LaunchError) throw error;
    throw new CliError('RUN_FAILED', `running ${vm.spec.name} failed: ${(error as Error).message}`, { cause: error });
  } finally {
    offEvent();
    offClose();
    offSignal();
  }
}
