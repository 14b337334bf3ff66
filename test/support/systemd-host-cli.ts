// Command line around SystemdHost for scripts (the demo): a host booted here keeps running after
// this process exits; its state lives in /run/vmkeep-testhost/NAME.json.
//   node dist/test/support/systemd-host-cli.js boot NAME      -> prints {"pid1",...} as JSON
//   node dist/test/support/systemd-host-cli.js exec NAME -- CMD [ARGS...]
//   node dist/test/support/systemd-host-cli.js shutdown NAME
import { SystemdHost } from './systemd-host.js';

const USAGE = 'usage: systemd-host-cli boot NAME | exec NAME -- CMD [ARGS...] | shutdown NAME';

async function main(argv: string[]): Promise<number> {
  const [verb, name, ...rest] = argv;
  if (!verb || !name) throw new Error(USAGE);
  switch (verb) {
    case 'boot': {
      const host = await SystemdHost.boot({ name });
      process.stdout.write(
        `${JSON.stringify({ name: host.name, pid1: host.pid1, busAddress: host.busAddress, runDir: host.runDir, consoleLog: host.consoleLog, bootMs: host.bootMs })}\n`,
      );
      return 0;
    }
    case 'exec': {
      const [dashes, cmd, ...args] = rest;
      if (dashes !== '--' || !cmd) throw new Error(USAGE);
      const host = await SystemdHost.attach(name);
      const child = host.spawnInside(cmd, args, { stdio: 'inherit' });
      return new Promise((resolve, reject) => {
        child.once('error', reject);
        child.once('exit', (code, signal) => resolve(code ?? (signal ? 128 : 1)));
      });
    }
    case 'shutdown':
      await SystemdHost.cleanup(name);
      return 0;
    default:
      throw new Error(USAGE);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`systemd-host-cli: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 2;
  },
);
