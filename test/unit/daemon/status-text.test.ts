// The STATUS= line vmkeepd sends to systemd: its text, and its updates after events (the real
// systemd's view of it: test/integration/daemon-status.test.ts).
import { describe, expect, it } from 'vitest';
import type { DaemonEvent, UpgradeStatus, VmView } from '../../../daemon/model.js';
import { startStatusUpdates, statusText, type StatusSource } from '../../../daemon/status-text.js';
import { within } from '../qmp/fake-peer.js';

describe('statusText', () => {
  it('counts VMs by state, stale VMs and running refresh jobs', () => {
    expect(statusText({ states: [], jobs: [] })).toBe('no VMs');
    expect(statusText({ states: ['running'], stale: 0, jobs: [] })).toBe('1 VM (1 running)');
    expect(statusText({ states: ['running', 'stopped', 'running'], stale: 2, jobs: ['refresh-3'] }))
      .toBe('3 VMs (2 running, 1 stopped), 2 stale, refresh job refresh-3 running');
    expect(statusText({ states: ['running'], jobs: ['a', 'b'] })).toBe('1 VM (1 running), refresh jobs a, b running');
  });
});

class FakeSource implements StatusSource {
  states: string[] = [];
  stale = 0;
  listCalls = 0;
  private readonly listeners = new Set<(event: DaemonEvent) => void>();
  async list(): Promise<VmView[]> {
    this.listCalls++;
    return this.states.map((state, i) => ({ name: `vm${i}`, state }) as VmView);
  }
  async upgradeStatus(): Promise<UpgradeStatus> {
    return { vms: Array.from({ length: this.stale }, () => ({ stale: true })) } as unknown as UpgradeStatus;
  }
  subscribe(listener: (event: DaemonEvent) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }
  emit(event: Omit<DaemonEvent, 'time'>): void {
    for (const l of this.listeners) l({ ...event, time: '' });
  }
}

async function until(sent: string[], count: number): Promise<void> {
  await within((async () => {
    while (sent.length < count) await new Promise((resolve) => setTimeout(resolve, 5));
  })(), 5_000, `${count} status line(s) sent`);
}

describe('startStatusUpdates', () => {
  it('sends at once, then once per burst of events, only when the text changed; follows refresh jobs', async () => {
    const source = new FakeSource();
    source.states = ['running'];
    const sent: string[] = [];
    const stop = startStatusUpdates(source, (text) => sent.push(text), 20);
    try {
      await until(sent, 1);
      expect(sent).toEqual(['1 VM (1 running)']);
      const before = source.listCalls;
      source.states = ['running', 'stopped'];
      source.stale = 1;
      for (let i = 0; i < 50; i++) source.emit({ type: 'vm-state', vm: 'vm1' });
      source.emit({ type: 'refresh', job: 'refresh-9', vm: 'vm0', step: 'started' });
      await until(sent, 2);
      expect(sent[1]).toBe('2 VMs (1 running, 1 stopped), 1 stale, refresh job refresh-9 running');
      expect(source.listCalls - before).toBe(1);
      source.emit({ type: 'refresh', job: 'refresh-9', step: 'job-done' });
      await until(sent, 3);
      expect(sent[2]).toBe('2 VMs (1 running, 1 stopped), 1 stale');
      // Nothing changed: nothing sent.
      source.emit({ type: 'vm-power', vm: 'vm0' });
      await new Promise((resolve) => setTimeout(resolve, 60));
      expect(sent).toHaveLength(3);
    } finally {
      stop();
    }
  });
});
