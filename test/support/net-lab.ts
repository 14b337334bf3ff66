// A network for NIC tests: a network namespace of the test's own with a Linux bridge that has
// an address (the "host side"), in which the private systemd, vmkeepd and its QEMUs run. Clients
// reach the guests through a small TCP pipe run in that namespace, driven from the test process.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { run } from './systemd-host.js';

export const LAB_BRIDGE = 'br0';
export const LAB_HOST_IP = '10.77.0.1';

/** Fails (never skips) without the tools, naming the package. */
export function requireNetLabTools(): void {
  if (!['/usr/bin/ip', '/usr/sbin/ip', '/bin/ip', '/sbin/ip'].some((p) => existsSync(p))) throw new Error('ip is missing: install iproute2');
  if (!existsSync('/bin/busybox')) throw new Error('/bin/busybox is missing: install busybox-static');
}

export class NetLab {
  private constructor(readonly name: string) {}

  /** The namespace's path, for SystemdHost's netns option. */
  get path(): string {
    return `/run/netns/${this.name}`;
  }

  /** Creates the namespace `name` (removing one a crashed run left) with bridge br0 at 10.77.0.1/24. */
  static async create(name: string): Promise<NetLab> {
    requireNetLabTools();
    const lab = new NetLab(name);
    await lab.destroy();
    await must(run('ip', ['netns', 'add', name], 10_000), `ip netns add ${name}`);
    try {
      await lab.ip('link', 'set', 'lo', 'up');
      await lab.addBridge();
    } catch (error) {
      await lab.destroy();
      throw error;
    }
    return lab;
  }

  /** Makes br0 with its address and brings it up (as a network configuration does at a network restart). */
  async addBridge(): Promise<void> {
    await this.ip('link', 'add', LAB_BRIDGE, 'type', 'bridge');
    // No STP delay: a port forwards as soon as it is up (a migration's new TAP included).
    await this.ip('link', 'set', LAB_BRIDGE, 'type', 'bridge', 'forward_delay', '0', 'stp_state', '0');
    await this.ip('addr', 'add', `${LAB_HOST_IP}/24`, 'dev', LAB_BRIDGE);
    await this.ip('link', 'set', LAB_BRIDGE, 'up');
  }

  /** Deletes br0: its ports (the TAPs) are left on no bridge. */
  async deleteBridge(): Promise<void> {
    await this.ip('link', 'del', LAB_BRIDGE);
  }

  /** Host PIDs of the processes in this namespace whose command line is exactly `argv`. */
  processes(argv: readonly string[]): number[] {
    const ns = statSync(this.path).ino;
    const want = `${argv.join('\0')}\0`;
    return readdirSync('/proc').filter((d) => /^\d+$/.test(d)).map(Number).filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8') === want && statSync(`/proc/${pid}/ns/net`).ino === ns;
      } catch {
        return false; // gone meanwhile
      }
    });
  }

  /** `ip ARGS` inside the namespace; throws with its stderr. */
  async ip(...args: string[]): Promise<string> {
    return must(run('ip', ['-n', this.name, ...args], 10_000), `ip -n ${this.name} ${args.join(' ')}`);
  }

  /** Links of the namespace: name, the bridge it is attached to, operational state. */
  async links(): Promise<Array<{ name: string; master: string | undefined; up: boolean }>> {
    const listed = JSON.parse(await this.ip('-j', 'link', 'show')) as Array<{ ifname: string; master?: string; operstate?: string; flags?: string[] }>;
    return listed.map((l) => ({ name: l.ifname, master: l.master, up: (l.flags ?? []).includes('LOWER_UP') }));
  }

  /** Runs busybox in the namespace (its own process; the caller ends it). */
  spawnBusybox(args: string[]): ChildProcess {
    return spawn('ip', ['netns', 'exec', this.name, 'busybox', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  }

  /** Runs a Node.js script (`node -e`) in the namespace (its own process; the caller ends it). */
  spawnNode(script: string, args: string[]): ChildProcess {
    return spawn('ip', ['netns', 'exec', this.name, process.execPath, '-e', script, '--', ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
  }

  /** Removes the namespace; its links (bridge, TAPs) go with it once no process holds it. */
  async destroy(): Promise<void> {
    if (existsSync(this.path)) await must(run('ip', ['netns', 'del', this.name], 10_000), `ip netns del ${this.name}`);
  }
}

async function must(result: Promise<{ stdout: string; stderr: string; exitCode: number | null }>, what: string): Promise<string> {
  const r = await result;
  if (r.exitCode !== 0) throw new Error(`${what} failed (exit ${String(r.exitCode)}): ${r.stderr.trim()}`);
  return r.stdout;
}

/**
 * A TCP client as nc would be, with TCP_NODELAY as interactive protocols (ssh, databases) set
 * it: each line leaves at once, never held back by Nagle's algorithm behind an unacknowledged
 * one. Exits when the connection ends.
 */
const TCP_PIPE = [
  "const s = require('node:net').connect({ host: process.argv[1], port: Number(process.argv[2]) });",
  's.setNoDelay(true);',
  "process.stdin.pipe(s); s.pipe(process.stdout); s.on('error', () => process.exit(1)); s.on('close', () => process.exit(0));",
].join(' ');

/** What an echo session saw. */
export interface EchoReport {
  sent: number;
  echoed: number;
  /** Lines that came back out of order or not as sent (should be none). */
  wrong: string[];
  /** Whether the connection ended before stop(). */
  closed: boolean;
  /** Longest time without an echo, within each window marked with mark(). */
  gaps: Map<string, number>;
}

/**
 * One TCP connection (TCP_PIPE in the namespace) to an echo service: a numbered line every
 * `intervalMs`, each echo checked against what was sent, in order. mark(label) starts a window
 * whose longest gap between echoes is reported under that label.
 */
export class EchoSession {
  private sent = 0;
  private echoed = 0;
  private readonly wrong: string[] = [];
  private closed = false;
  private lastEcho = performance.now();
  private window: { label: string; longest: number } | undefined;
  private readonly gaps = new Map<string, number>();
  private buffer = '';
  private timer: NodeJS.Timeout | undefined;
  private readonly exited: Promise<void>;
  private readonly echoWaiters = new Set<() => void>();

  constructor(private readonly client: ChildProcess, intervalMs = 10) {
    client.stdout?.setEncoding('utf8');
    client.stdout?.on('data', (chunk: string) => this.onData(chunk));
    this.exited = new Promise((resolve) => client.once('exit', () => { this.closed = true; resolve(); }));
    client.stdin?.on('error', () => undefined);
    const send = (): void => {
      if (this.closed) return;
      this.sent += 1;
      client.stdin?.write(`${this.sent}\n`);
    };
    send();
    this.timer = setInterval(send, intervalMs);
  }

  /**
   * `probe`: busybox nc instead (no TCP_NODELAY, but it starts in a few ms where Node takes
   * ~100): for many short connections, such as probes of a forwarded port.
   */
  static open(lab: NetLab, address: string, port: number, intervalMs = 10, client: 'nodelay' | 'probe' = 'nodelay'): EchoSession {
    return new EchoSession(client === 'probe' ? lab.spawnBusybox(['nc', address, String(port)]) : lab.spawnNode(TCP_PIPE, [address, String(port)]), intervalMs);
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      const expected = String(this.echoed + 1);
      if (line !== expected && this.wrong.length < 20) this.wrong.push(`expected ${expected}, got ${JSON.stringify(line)}`);
      this.echoed += 1;
      const now = performance.now();
      if (this.window !== undefined) this.window.longest = Math.max(this.window.longest, now - this.lastEcho);
      this.lastEcho = now;
      for (const w of [...this.echoWaiters]) w();
    }
  }

  get echoes(): number {
    return this.echoed;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Starts a gap window (closing the previous one). */
  mark(label: string): void {
    this.endWindow();
    this.window = { label, longest: 0 };
  }

  /** Closes the current gap window, counting the time since the last echo too. */
  endWindow(): void {
    if (this.window === undefined) return;
    this.window.longest = Math.max(this.window.longest, performance.now() - this.lastEcho);
    this.gaps.set(this.window.label, this.window.longest);
    this.window = undefined;
  }

  /** Resolves once `count` more echoes arrived; rejects after timeoutMs, or when the connection ends. */
  async waitForEchoes(count: number, timeoutMs: number, what: string): Promise<void> {
    const target = this.echoed + count;
    await new Promise<void>((resolve, reject) => {
      const check = (): void => {
        if (this.echoed >= target) { done(); resolve(); }
      };
      const timer = setTimeout(() => { done(); reject(new Error(`${what}: ${count} echoes not seen within ${timeoutMs} ms (sent ${this.sent}, echoed ${this.echoed}, closed ${this.closed})`)); }, timeoutMs);
      const done = (): void => { clearTimeout(timer); this.echoWaiters.delete(check); };
      this.echoWaiters.add(check);
      void this.exited.then(() => { if (this.echoed < target) { done(); reject(new Error(`${what}: the connection closed (sent ${this.sent}, echoed ${this.echoed})`)); } });
      check();
    });
  }

  /** Stops sending, waits for the echoes of what was sent (up to timeoutMs), ends the client; the report. */
  async stop(timeoutMs = 5_000): Promise<EchoReport> {
    clearInterval(this.timer);
    this.endWindow();
    const closedBefore = this.closed;
    if (!this.closed && this.echoed < this.sent) await this.waitForEchoes(this.sent - this.echoed, timeoutMs, 'the last echoes').catch(() => undefined);
    if (!this.closed) this.client.kill('SIGKILL');
    await this.exited;
    return { sent: this.sent, echoed: this.echoed, wrong: [...this.wrong], closed: closedBefore, gaps: new Map(this.gaps) };
  }
}

/** Answers every connection with one line and closes it; says when it listens on every address and each accept. */
const LINE_SERVICE = [
  "const [hosts, port, line] = process.argv.slice(1); const all = hosts.split(','); let listening = 0;",
  "for (const host of all) {",
  "  const server = require('node:net').createServer((c) => { console.log('ACCEPTED'); c.on('error', () => undefined); c.end(line + '\\n'); });",
  "  server.listen(Number(port), host, () => { listening += 1; if (listening === all.length) console.log('LISTENING'); });",
  "}",
].join(' ');

/**
 * A service the host keeps to itself (a database, an admin API): TCP listeners on the
 * namespace's loopback only (127.0.0.1 and ::1), answering each connection with `line`. Counts
 * the connections it accepted, so a test tells "reached" from "not reached" on the host's side too.
 */
export class LoopbackService {
  private accepted = 0;

  private constructor(private readonly server: ChildProcess, private readonly exited: Promise<void>) {}

  static async start(lab: NetLab, port: number, line: string, timeoutMs = 30_000): Promise<LoopbackService> {
    const server = lab.spawnNode(LINE_SERVICE, ['127.0.0.1,::1', String(port), line]);
    const exited = new Promise<void>((resolve) => server.once('exit', () => resolve()));
    const service = new LoopbackService(server, exited);
    let stderr = '';
    server.stderr?.setEncoding('utf8');
    server.stderr?.on('data', (chunk: string) => { stderr += chunk; });
    server.stdout?.setEncoding('utf8');
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`the loopback service on port ${port} did not listen within ${timeoutMs} ms: ${stderr}`)), timeoutMs);
      void exited.then(() => { clearTimeout(timer); reject(new Error(`the loopback service on port ${port} exited: ${stderr}`)); });
      let buffer = '';
      server.stdout?.on('data', (chunk: string) => {
        const lines = (buffer + chunk).split('\n');
        buffer = lines.pop() ?? '';
        for (const word of lines) {
          if (word === 'LISTENING') { clearTimeout(timer); resolve(); }
          if (word === 'ACCEPTED') service.accepted += 1;
        }
      });
    }).catch(async (error: unknown) => {
      await service.stop();
      throw error;
    });
    return service;
  }

  /** Connections accepted so far. */
  get connections(): number {
    return this.accepted;
  }

  async stop(): Promise<void> {
    if (this.server.exitCode === null && this.server.signalCode === null) this.server.kill('SIGKILL');
    await this.exited;
  }
}
