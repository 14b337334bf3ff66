// --idle-exit: a socket-activated vmkeepd with nothing to look after (no QEMU, no operation,
// no client connected) for that long exits; vmkeepd.socket keeps the control socket and starts
// it again at the next connection, as libvirt's modular daemons do (ARCHITECTURE.md, invariant 12).

export interface IdleFacts {
  /** Connections to the control API now open (event streams and `vmkeep logs -f` included). */
  connections: number;
  /** VMs with a QEMU: vmkeepd supervises them. */
  vmsWithQemu: number;
  /** Operations under way on VMs (a start, a stop, a refresh, a reattach). */
  operations: number;
}

/** Nothing to look after (pure). */
export function isIdle(facts: IdleFacts): boolean {
  return facts.connections === 0 && facts.vmsWithQemu === 0 && facts.operations === 0;
}

export interface IdleWatch {
  /** Something may have changed (a connection, a VM event): looked at again. */
  poke(): void;
  stop(): void;
}

/**
 * Calls `onIdle` once the facts have been idle for `idleMs` without a break: the timer is armed
 * when they become idle, dropped when they stop being so, and the facts are read again when it
 * fires (an operation that began without an event keeps the daemon up).
 */
export function watchIdle(idleMs: number, facts: () => IdleFacts, onIdle: () => void): IdleWatch {
  let timer: NodeJS.Timeout | undefined;
  let done = false;
  const poke = (): void => {
    if (done) return;
    if (!isIdle(facts())) {
      clearTimeout(timer);
      timer = undefined;
      return;
    }
    timer ??= setTimeout(() => {
      timer = undefined;
      if (done) return;
      if (!isIdle(facts())) return poke();
      done = true;
      onIdle();
    }, idleMs);
  };
  poke();
  return {
    poke,
    stop() {
      done = true;
      clearTimeout(timer);
    },
  };
}
