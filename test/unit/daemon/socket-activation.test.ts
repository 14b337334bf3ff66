// sd_listen_fds semantics of vmkeepd's socket activation, from the environment alone.
import { describe, expect, it } from 'vitest';
import { controlSocketFd, listenFdsFromEnv, takeControlSockets } from '../../../daemon/socket-activation.js';

describe('listenFdsFromEnv', () => {
  it('reads the descriptors from 3 on, with their names, only when LISTEN_PID is this process', () => {
    const env = { LISTEN_PID: '42', LISTEN_FDS: '2', LISTEN_FDNAMES: 'control:operator' };
    expect(listenFdsFromEnv(env, 42)).toEqual([{ fd: 3, name: 'control' }, { fd: 4, name: 'operator' }]);
    expect(listenFdsFromEnv(env, 43), 'meant for another process').toEqual([]);
    expect(listenFdsFromEnv({ LISTEN_PID: '42', LISTEN_FDS: '1' }, 42)).toEqual([{ fd: 3, name: 'unknown' }]);
  });

  it('passes nothing when the variables are absent or malformed', () => {
    expect(listenFdsFromEnv({}, 42)).toEqual([]);
    expect(listenFdsFromEnv({ LISTEN_FDS: '1' }, 42)).toEqual([]);
    expect(listenFdsFromEnv({ LISTEN_PID: '42', LISTEN_FDS: 'x' }, 42)).toEqual([]);
    expect(listenFdsFromEnv({ LISTEN_PID: '42abc', LISTEN_FDS: '1' }, 42)).toEqual([]);
  });
});

describe('controlSocketFd', () => {
  it('takes the one named control, or the only one; none without systemd', () => {
    expect(controlSocketFd([{ fd: 3, name: 'operator' }, { fd: 4, name: 'control' }])).toBe(4);
    expect(controlSocketFd([{ fd: 3, name: 'unknown' }])).toBe(3);
    expect(controlSocketFd([])).toBeUndefined();
  });

  it('refuses several sockets none of which is named control, saying how to name it', () => {
    expect(() => controlSocketFd([{ fd: 3, name: 'a' }, { fd: 4, name: 'b' }])).toThrow(/FileDescriptorName=control/);
  });
});

describe('takeControlSockets', () => {
  it('removes the LISTEN_ variables, so QEMU and other children never take them for theirs', () => {
    const env: NodeJS.ProcessEnv = { LISTEN_PID: '7', LISTEN_FDS: '1', LISTEN_FDNAMES: 'control', PATH: '/bin' };
    expect(takeControlSockets(env, 7)).toEqual({ control: 3 });
    expect(env).toEqual({ PATH: '/bin' });
    expect(takeControlSockets(env, 7)).toEqual({});
  });

  it('takes the operator socket by its name only, beside the control socket', () => {
    expect(takeControlSockets({ LISTEN_PID: '7', LISTEN_FDS: '2', LISTEN_FDNAMES: 'operator:control' }, 7)).toEqual({ control: 4, operator: 3 });
    expect(takeControlSockets({ LISTEN_PID: '7', LISTEN_FDS: '2', LISTEN_FDNAMES: 'unknown:operator' }, 7)).toEqual({ control: 3, operator: 4 });
  });
});
