// The in-process CLI test harness: a real control API server on a temp socket over the fake
// DaemonOps, and the command line (quick path, then yargs) run with captured output and a
// hand-played Ctrl-C.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterEach, beforeEach } from 'vitest';
import { runCommandLine, type CliIo } from '../../../cli/index.js';
import { startApiServer, type ApiServer } from '../../../daemon/api-server.js';
import { FakeDaemonOps } from '../daemon/fake-ops.js';
import { within } from '../qmp/fake-peer.js';

/** A stream that keeps what is written and can wait for a part of it. */
export class Capture extends Writable {
  text = '';
  private readonly waiters: Array<{ part: string; resolve: () => void }> = [];

  constructor(readonly isTTY = false) {
    super();
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: () => void): void {
    this.text += chunk.toString('utf8');
    for (const w of this.waiters.splice(0)) (this.text.includes(w.part) ? w.resolve() : this.waiters.push(w));
    callback();
  }

  until(part: string): Promise<void> {
    if (this.text.includes(part)) return Promise.resolve();
    return within(new Promise<void>((resolve) => this.waiters.push({ part, resolve })), 3000, `${JSON.stringify(part)} in the output`);
  }
}

export interface StartOptions {
  env?: NodeJS.ProcessEnv;
  /** false: no --socket argument; a string: that socket instead of the harness's. */
  socket?: boolean | string;
  /** stderr claims to be a terminal (progress bars). */
  tty?: boolean;
  io?: Partial<CliIo>;
}

export interface CliHarness {
  readonly dir: string;
  /** The API server; a test may close it or put another in its place (closed after the test). */
  server: ApiServer;
  readonly socketPath: string;
  readonly ops: FakeDaemonOps;
  /** Starts the CLI; `signal()` plays the user's Ctrl-C. */
  start(args: string[], options?: StartOptions): {
    stdout: Capture;
    stderr: Capture;
    exit: Promise<number>;
    signal(): void;
  };
  /** Runs the CLI to its end. */
  vmkeep(args: string[], options?: StartOptions): Promise<{ code: number; stdout: string; stderr: string }>;
}

/** Registers the per-test server set-up and tear-down; the fields are fresh in every test. */
export function useCliHarness(prefix: string): CliHarness {
  let dir = '';
  let socketPath = '';
  let ops: FakeDaemonOps | undefined;
  let server: ApiServer | undefined;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), prefix));
    socketPath = join(dir, 'vmkeep.sock');
    ops = new FakeDaemonOps(dir);
    server = await startApiServer({ socketPath, ops, operations: ops.operations });
  });
  afterEach(async () => {
    await server?.close();
    await rm(dir, { recursive: true, force: true });
  });
  const harness: CliHarness = {
    get dir() {
      return dir;
    },
    get socketPath() {
      return socketPath;
    },
    get server() {
      if (server === undefined) throw new Error('the CLI harness is used outside a test');
      return server;
    },
    set server(next: ApiServer) {
      server = next;
    },
    get ops() {
      if (ops === undefined) throw new Error('the CLI harness is used outside a test');
      return ops;
    },
    start(args, options = {}) {
      const stdout = new Capture();
      const stderr = new Capture(options.tty ?? false);
      const listeners = new Set<(signal: NodeJS.Signals) => void>();
      const socket = options.socket === undefined || options.socket === true ? socketPath : options.socket;
      const argv = socket === false ? args : [...args, '--socket', socket];
      const exit = runCommandLine(argv, {
        stdout,
        stderr,
        env: options.env ?? {},
        onSignal(listener) {
          listeners.add(listener);
          return () => listeners.delete(listener);
        },
        ...options.io,
      });
      return {
        stdout,
        stderr,
        exit: within(exit, 5000, `vmkeep ${args.join(' ')} to end`),
        signal: () => {
          for (const listener of listeners) listener('SIGINT');
        },
      };
    },
    async vmkeep(args, options = {}) {
      const run = harness.start(args, options);
      const code = await run.exit;
      return { code, stdout: run.stdout.text, stderr: run.stderr.text };
    },
  };
  return harness;
}
