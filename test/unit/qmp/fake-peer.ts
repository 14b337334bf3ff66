import { Duplex } from 'node:stream';
import { QmpClient, type QmpClientOptions } from '../../../qmp/index.js';

/** One end of an in-memory, bidirectional byte pipe (what a socketpair gives in C). */
class PipeEnd extends Duplex {
  peer: PipeEnd | undefined;

  override _read(): void {
    // Data is pushed by the other end's _write.
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    if (this.peer && !this.peer.destroyed) this.peer.push(chunk);
    callback();
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.peer?.push(null);
    callback();
  }

  override _destroy(error: Error | null, callback: (error?: Error | null) => void): void {
    // Like a socket: when one side goes away, the other reads EOF.
    if (this.peer && !this.peer.readableEnded && !this.peer.destroyed) this.peer.push(null);
    callback(error);
  }
}

export function pipePair(): [PipeEnd, PipeEnd] {
  const a = new PipeEnd();
  const b = new PipeEnd();
  a.peer = b;
  b.peer = a;
  return [a, b];
}

export interface ReceivedCommand {
  execute: string;
  arguments?: Record<string, unknown>;
  id: number;
}

/** Rejects with a message naming what was awaited if `promise` does not settle in time. */
export function within<T>(promise: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

export const GREETING_NO_OOB = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 19 }, package: 'Debian 1:7.2+dfsg-7' }, capabilities: [] },
};
export const GREETING_OOB = {
  QMP: { version: { qemu: { major: 7, minor: 2, micro: 19 }, package: 'Debian 1:7.2+dfsg-7' }, capabilities: ['oob'] },
};

/**
 * The QEMU side of an in-memory QMP connection, scripted by the test. Commands the client
 * writes are parsed and queued; the test takes them with nextCommand() and answers.
 */
export class FakeQmpPeer {
  readonly clientEnd: Duplex;
  private readonly end: PipeEnd;
  private buffered = '';
  private readonly commands: ReceivedCommand[] = [];
  private readonly takers: ((cmd: ReceivedCommand) => void)[] = [];
  /** Resolves when the client side has gone (EOF or destroyed). */
  readonly clientGone: Promise<void>;

  constructor() {
    const [clientEnd, peerEnd] = pipePair();
    this.clientEnd = clientEnd;
    this.end = peerEnd;
    peerEnd.setEncoding('utf8');
    peerEnd.on('data', (text: string) => {
      this.buffered += text;
      let newline: number;
      while ((newline = this.buffered.indexOf('\n')) !== -1) {
        const line = this.buffered.slice(0, newline);
        this.buffered = this.buffered.slice(newline + 1);
        const cmd = JSON.parse(line) as ReceivedCommand;
        const taker = this.takers.shift();
        if (taker) taker(cmd);
        else this.commands.push(cmd);
      }
    });
    this.clientGone = new Promise((resolve) => {
      peerEnd.on('end', () => resolve());
      peerEnd.on('close', () => resolve());
    });
    peerEnd.on('error', () => {
      // The client going away mid-write is part of what the tests provoke.
    });
  }

  nextCommand(what = 'the next QMP command from the client', ms = 2000): Promise<ReceivedCommand> {
    const queued = this.commands.shift();
    if (queued) return Promise.resolve(queued);
    return within(new Promise<ReceivedCommand>((resolve) => this.takers.push(resolve)), ms, what);
  }

  send(message: unknown): void {
    this.sendRaw(`${JSON.stringify(message)}\r\n`);
  }

  sendRaw(data: string | Buffer): void {
    if (!this.end.destroyed) this.end.write(data);
  }

  reply(id: number, value: unknown = {}): void {
    this.send({ return: value, id });
  }

  replyError(id: number, qmpClass: string, desc: string): void {
    this.send({ error: { class: qmpClass, desc }, id });
  }

  event(event: string, data?: Record<string, unknown>): void {
    this.send({ event, ...(data ? { data } : {}), timestamp: { seconds: 1700000000, microseconds: 42 } });
  }

  /** EOF towards the client, as when QEMU exits. */
  hangUp(): void {
    this.end.end();
  }

  destroy(): void {
    this.end.destroy();
  }
}

/** A client that finished greeting and negotiation against a fresh fake peer. */
export async function negotiatedPair(
  options: QmpClientOptions = {},
): Promise<{ client: QmpClient; peer: FakeQmpPeer }> {
  const peer = new FakeQmpPeer();
  const connecting = QmpClient.fromStream(peer.clientEnd, options);
  peer.send(GREETING_NO_OOB);
  const caps = await peer.nextCommand('qmp_capabilities');
  peer.reply(caps.id);
  const client = await within(connecting, 2000, 'negotiation to finish');
  return { client, peer };
}
