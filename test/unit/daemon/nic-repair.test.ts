// planTapRepairs (pure) and NicRepair on a fake host's links: what is done about each TAP of a
// running VM when the host's network was reconfigured.
import { describe, expect, it, vi } from 'vitest';
import { validateSpec } from '../../../launcher/index.js';
import { createLogger } from '../../../daemon/log.js';
import type { DaemonEvent } from '../../../daemon/model.js';
import { LINK_CHANGE_DEBOUNCE_MS, nicProblemOf, NicRepair, planTapRepairs, runningTaps, type RunningTap } from '../../../daemon/nic-repair.js';
import { TapKeeper, type HostLink, type NetPort } from '../../../daemon/taps.js';
import { newEntry } from '../../../daemon/vm-entry.js';
import type { VmRecord } from '../../../daemon/records.js';

const TAP = 'vk525400000001a';
const web: RunningTap = { nic: 0, tap: TAP, bridge: 'br0' };
const bridge: HostLink = { name: 'br0', kind: 'bridge', up: true };
const onBridge: HostLink = { name: TAP, kind: 'tun', master: 'br0', up: true };

function decide(links: HostLink[]): string[] {
  return planTapRepairs([{ vm: 'web', taps: [web] }], links).map((d) => `${d.action}${d.why === undefined ? '' : ` (${d.why})`}`);
}

describe('planTapRepairs', () => {
  it('leaves a TAP on its bridge and up alone', () => {
    expect(decide([bridge, onBridge])).toEqual(['none']);
  });

  it('puts back a TAP off its bridge, on another bridge, or down', () => {
    expect(decide([bridge, { ...onBridge, master: undefined }])).toEqual(['attach (on no bridge)']);
    expect(decide([bridge, { name: 'br9', kind: 'bridge' }, { ...onBridge, master: 'br9' }])).toEqual(['attach (on br9)']);
    expect(decide([bridge, { ...onBridge, up: false }])).toEqual(['attach (down)']);
  });

  it('waits for a missing bridge (or a link of that name that is no bridge)', () => {
    expect(decide([{ ...onBridge, master: undefined }])).toEqual(['bridge-missing']);
    expect(decide([{ name: 'br0', kind: undefined }, { ...onBridge, master: undefined }])).toEqual(['bridge-missing']);
  });

  it('reports a TAP that no longer exists, bridge or not', () => {
    expect(decide([bridge])).toEqual(['tap-gone']);
    expect(decide([])).toEqual(['tap-gone']);
  });

  it('says the fix of each problem, and none for a TAP that was put back', () => {
    const [gone] = planTapRepairs([{ vm: 'web', taps: [web] }], [bridge]);
    expect(nicProblemOf(gone!)).toMatchObject({ problem: 'tap-gone', fix: 'vmkeep stop web && vmkeep start web (the guest restarts; its new QEMU gets a new TAP)' });
    const [off] = planTapRepairs([{ vm: 'web', taps: [web] }], [bridge, { ...onBridge, master: undefined }]);
    expect(nicProblemOf(off!)).toBeUndefined();
    expect(nicProblemOf(off!, 'repair is off')).toMatchObject({ problem: 'detached', fix: `ip link set dev ${TAP} master br0 up` });
  });
});

describe('runningTaps', () => {
  const spec = validateSpec({
    name: 'web', kernel: '/k',
    nics: [{ mode: 'user', mac: '52:54:00:00:00:09', hostForward: [] }, { mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' }, { mode: 'bridge', bridge: 'br1', mac: '52:54:00:00:00:02' }],
  });
  const proc = { pid: 1, startTime: '1', scope: null };

  it('pairs each TAP of the running QEMU (either slot) with its NIC\'s bridge; none without a QEMU', () => {
    expect(runningTaps({ spec, process: { ...proc, taps: ['vk525400000001b', 'vk525400000002b'] } })).toEqual([
      { nic: 1, tap: 'vk525400000001b', bridge: 'br0' }, { nic: 2, tap: 'vk525400000002b', bridge: 'br1' },
    ]);
    expect(runningTaps({ spec })).toEqual([]);
  });
});

/** A host whose links the test changes, and a link watch the test fires. */
function fakeHost(links: HostLink[], failAttach = false) {
  const calls: string[] = [];
  let fire: (() => void) | undefined;
  let watching = false;
  const net: NetPort = {
    links: async () => links.map((l) => ({ ...l })),
    addTap: async () => { throw new Error('not used'); },
    attachTap: async (name, bridgeName) => {
      calls.push(`attach ${name} ${bridgeName}`);
      if (failAttach) throw new Error('RTNETLINK answers: Operation not permitted');
      const link = links.find((l) => l.name === name);
      if (link !== undefined) Object.assign(link, { master: bridgeName, up: true });
    },
    removeTap: async () => { throw new Error('not used'); },
    watchLinks: (onChange) => {
      fire = onChange;
      watching = true;
      return { close: async () => { watching = false; } };
    },
  };
  return { net, calls, fire: () => fire?.(), get watching() { return watching; } };
}

function world(links: HostLink[], options: { repair?: boolean; failAttach?: boolean } = {}) {
  const host = fakeHost(links, options.failAttach);
  const logger = createLogger({ name: 'test', level: 'fatal', write: () => undefined });
  const record = {
    name: 'web', state: 'running',
    spec: validateSpec({ name: 'web', kernel: '/k', nics: [{ mode: 'bridge', bridge: 'br0', mac: '52:54:00:00:00:01' }] }),
    process: { pid: 1, startTime: '1', scope: null, taps: [TAP] },
  } as unknown as VmRecord;
  const entry = newEntry(record);
  const events: Array<Omit<DaemonEvent, 'time'>> = [];
  const repair = new NicRepair({
    entries: () => [entry], net: host.net, taps: new TapKeeper(host.net, logger), logger, emit: (e) => events.push(e), isClosed: () => false,
  }, options.repair !== false);
  return { host, entry, events, repair };
}

describe('NicRepair', () => {
  it('puts a detached TAP back and says so in an event; nothing more at the next look', async () => {
    const w = world([bridge, { ...onBridge, master: undefined }]);
    await w.repair.check('reattach');
    expect(w.host.calls).toEqual([`attach ${TAP} br0`]);
    expect(w.events).toEqual([{ type: 'vm-network', vm: 'web', message: `TAP ${TAP} of nics[0] was on no bridge: put back on bridge br0 and up (reattach)` }]);
    expect(w.entry.nicProblems).toBeUndefined();
    await w.repair.check('again');
    expect(w.host.calls).toHaveLength(1);
    expect(w.events).toHaveLength(1);
  });

  it('with repair off, only reports (status and one event), and does not report it again', async () => {
    const w = world([bridge, { ...onBridge, master: undefined }], { repair: false });
    await w.repair.check('reattach');
    await w.repair.check('again');
    expect(w.host.calls).toEqual([]);
    expect(w.entry.nicProblems?.map((p) => p.problem)).toEqual(['detached']);
    expect(w.events.map((e) => e.message)).toEqual([`TAP ${TAP} is on no bridge, not on br0: the guest's NIC is cut off (repair is off (--no-tap-repair)); fix: ip link set dev ${TAP} master br0 up`]);
  });

  it('reports an attach that fails, with ip\'s reason', async () => {
    const w = world([bridge, { ...onBridge, master: undefined }], { failAttach: true });
    await w.repair.check('reattach');
    expect(w.entry.nicProblems?.[0]?.message).toContain('Operation not permitted');
  });

  it('waits for a missing bridge and puts the TAP back once a link change shows it again', async () => {
    const links: HostLink[] = [{ ...onBridge, master: undefined }];
    const w = world(links);
    w.repair.start();
    await w.repair.check('reattach');
    expect(w.entry.nicProblems?.map((p) => p.problem)).toEqual(['bridge-missing']);
    expect(w.host.calls).toEqual([]);
    links.push({ ...bridge });
    // A burst of changes is one look.
    for (let i = 0; i < 5; i++) w.host.fire();
    await vi.waitFor(() => expect(w.host.calls).toEqual([`attach ${TAP} br0`]), { timeout: LINK_CHANGE_DEBOUNCE_MS * 20 });
    await w.repair.check('settled');
    expect(w.host.calls).toHaveLength(1);
    expect(w.entry.nicProblems).toBeUndefined();
    expect(w.events.map((e) => e.message?.split(':')[0])).toEqual(['bridge br0 does not exist', `TAP ${TAP} of nics[0] was on no bridge`]);
    expect(w.host.watching).toBe(true);
    await w.repair.close();
    expect(w.host.watching).toBe(false);
  });

  it('reports a TAP deleted under its QEMU with the fix, and never makes one', async () => {
    const w = world([bridge]);
    await w.repair.check('reattach');
    expect(w.host.calls).toEqual([]);
    expect(w.entry.nicProblems?.map((p) => [p.problem, p.tap])).toEqual([['tap-gone', TAP]]);
  });
});
