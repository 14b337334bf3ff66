import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { validateSpec } from '../../../launcher/index.js';
import { DaemonError } from '../../../daemon/errors.js';
import {
  nodeRecordFs, parseRecord, RECORD_SCHEMA, RECORD_UPGRADES, RecordStore, tempFileTarget, upgradeRecord,
  type RecordFileHandle, type RecordFs, type RecordUpgrades, type VmRecord,
} from '../../../daemon/records.js';

let dir: string;

beforeEach(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmkeep-records-'));
});

afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
});

function sample(name = 'web', patch: Partial<VmRecord> = {}): VmRecord {
  return {
    schema: RECORD_SCHEMA, channel: 'default',
    name,
    uuid: '123e4567-e89b-12d3-a456-426614174000',
    spec: validateSpec({ name, kernel: '/boot/vmlinuz', append: 'console=ttyS0', memoryMiB: 256 }),
    machineType: 'pc-q35-7.2',
    installation: { name: 'system', binary: '/usr/bin/qemu-system-x86_64', moduleDir: '/usr/lib/qemu', firmwareDirs: ['/usr/share/qemu'] },
    binary: { path: '/usr/bin/qemu-system-x86_64', dev: 2049, ino: 123456, size: 20_000_000, mtimeMs: 1_700_000_000_123.25, version: '7.2.11' },
    process: { pid: 4242, startTime: '8836573', scope: `vmkeep-${name}.scope` },
    paths: { qmpSocket: `/run/vmkeep/${name}.qmp`, serialLog: `/var/lib/vmkeep/${name}/serial.log`, stderrLog: `/var/lib/vmkeep/${name}/qemu.log` },
    state: 'running',
    lastExit: { reason: 'guest shutdown', at: '2024-05-01T10:00:00.000Z' },
    problem: 'nothing serious',
    createdAt: '2024-05-01T09:00:00.000Z',
    updatedAt: '2024-05-01T10:00:01.000Z',
    ...patch,
  };
}

function text(value: unknown): string {
  return `${JSON.stringify(value, null, 2)}\n`;
}

/** A JSON copy of the sample record with one field (dotted path) set, or deleted when value is undefined. */
function mutated(path: string, value: unknown): Record<string, unknown> {
  const raw = JSON.parse(JSON.stringify(sample())) as Record<string, unknown>;
  const keys = path.split('.');
  let obj = raw as Record<string, unknown>;
  for (const key of keys.slice(0, -1)) obj = obj[key] as Record<string, unknown>;
  const last = keys[keys.length - 1] as string;
  if (value === undefined) delete obj[last];
  else obj[last] = value;
  return raw;
}

function caught(fn: () => unknown): DaemonError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(DaemonError);
    return err as DaemonError;
  }
  throw new Error('expected a DaemonError, nothing was thrown');
}

async function caughtAsync(promise: Promise<unknown>): Promise<DaemonError> {
  try {
    await promise;
  } catch (err) {
    expect(err).toBeInstanceOf(DaemonError);
    return err as DaemonError;
  }
  throw new Error('expected a DaemonError, nothing was thrown');
}

describe('parseRecord', () => {
  it('reads back what was serialised, optional fields absent rather than undefined', () => {
    expect(parseRecord(text(sample()), '/state/vms/web.json')).toEqual(sample());
    const bare = sample();
    delete bare.binary;
    delete bare.process;
    delete bare.lastExit;
    delete bare.problem;
    const parsed = parseRecord(text(bare), 'web.json');
    expect(parsed).toEqual(bare);
    expect(Object.keys(parsed)).not.toContain('process');
    expect(parseRecord(text(sample('db', { process: { pid: 1, startTime: '5', scope: null } })), 'db.json').process?.scope).toBeNull();
  });

  it.each<[string, unknown, string]>([
    ['name', 5, 'name'],
    ['name', 'Web!', 'name'],
    ['name', 'other', 'name'],
    ['name', undefined, 'name'],
    ['uuid', 'not-a-uuid', 'uuid'],
    ['uuid', 12, 'uuid'],
    ['spec', 'a string', 'spec'],
    ['spec', null, 'spec'],
    ['spec.memoryMiB', 1, 'spec.memoryMiB'],
    ['spec.kernel', 'relative/vmlinuz', 'spec.kernel'],
    ['spec.colour', 'blue', 'spec.colour'],
    ['spec.name', 'other', 'spec.name'],
    ['machineType', '', 'machineType'],
    ['machineType', 'pc,accel=kvm', 'machineType'],
    ['machineType', undefined, 'machineType'],
    ['installation', null, 'installation'],
    ['installation.name', 1, 'installation.name'],
    ['installation.binary', 'qemu', 'installation.binary'],
    ['installation.moduleDir', 3, 'installation.moduleDir'],
    ['installation.firmwareDirs', '/usr/share/qemu', 'installation.firmwareDirs'],
    ['installation.firmwareDirs', ['/ok', 'rel'], 'installation.firmwareDirs[1]'],
    ['installation.extra', true, 'installation.extra'],
    ['binary', null, 'binary'],
    ['binary.path', undefined, 'binary.path'],
    ['binary.dev', -1, 'binary.dev'],
    ['binary.ino', 1.5, 'binary.ino'],
    ['binary.size', '1', 'binary.size'],
    ['binary.mtimeMs', 'yesterday', 'binary.mtimeMs'],
    ['binary.version', 7, 'binary.version'],
    ['process', [], 'process'],
    ['process.pid', 0, 'process.pid'],
    ['process.pid', '4242', 'process.pid'],
    ['process.startTime', 8836573, 'process.startTime'],
    ['process.startTime', '88x', 'process.startTime'],
    ['process.scope', '', 'process.scope'],
    ['process.scope', undefined, 'process.scope'],
    ['paths', undefined, 'paths'],
    ['paths.qmpSocket', 'qmp.sock', 'paths.qmpSocket'],
    ['paths.serialLog', null, 'paths.serialLog'],
    ['paths.stderrLog', undefined, 'paths.stderrLog'],
    ['state', 'flying', 'state'],
    ['state', undefined, 'state'],
    ['lastExit', 'crash', 'lastExit'],
    ['lastExit.reason', 1, 'lastExit.reason'],
    ['lastExit.at', 'yesterday', 'lastExit.at'],
    ['problem', 42, 'problem'],
    ['createdAt', 'not a date', 'createdAt'],
    ['updatedAt', undefined, 'updatedAt'],
    ['schema', '1', 'schema'],
    ['schema', -1, 'schema'],
    ['surprise', 'field', 'surprise'],
  ])('refuses %s = %j as RECORD_CORRUPT naming field %s', (path, value, field) => {
    const err = caught(() => parseRecord(text(mutated(path, value)), '/state/vms/web.json'));
    expect(err.code).toBe('RECORD_CORRUPT');
    expect(err.message).toContain(`field "${field}"`);
    expect(err.message).toContain('/state/vms/web.json');
    expect(err.message).toMatch(/leaves this VM alone/);
  });

  it('names every bad field at once', () => {
    const raw = mutated('uuid', 'x');
    raw.state = 'flying';
    const err = caught(() => parseRecord(text(raw), 'web.json'));
    expect(err.message).toContain('field "uuid"');
    expect(err.message).toContain('field "state"');
  });

  it('refuses truncated, empty and non-JSON files as RECORD_CORRUPT naming the file', () => {
    const full = text(sample());
    for (let cut = 0; cut < full.length - 2; cut += 37) {
      const err = caught(() => parseRecord(full.slice(0, cut), '/state/vms/web.json'));
      expect(err.code).toBe('RECORD_CORRUPT');
      expect(err.message).toMatch(/^record file \/state\/vms\/web\.json is damaged: (is empty|is not complete JSON)/);
    }
    for (const junk of ['hello', '\0\0\0\0', '[1,2]', 'null', '"web"']) {
      expect(caught(() => parseRecord(junk, 'web.json')).code).toBe('RECORD_CORRUPT');
    }
  });

  it('refuses a newer schema with RECORD_TOO_NEW and says what to do', () => {
    const newer = { ...sample(), schema: RECORD_SCHEMA + 1, somethingNew: { x: 1 } };
    const err = caught(() => parseRecord(text(newer), '/state/vms/web.json'));
    expect(err.code).toBe('RECORD_TOO_NEW');
    expect(err.message).toMatch(
      /^record \/state\/vms\/web\.json was written by a newer vmkeepd \(schema 7, this one reads up to 6\): upgrade vmkeep.*or restore/);
  });
});

describe('schema upgrades', () => {
  // A made-up schema 0: the name was called vmName and the process was flat.
  const v0 = (): Record<string, unknown> => {
    const { name, process: proc, ...rest } = JSON.parse(JSON.stringify(sample())) as VmRecord;
    return { ...rest, schema: 0, vmName: name, pid: proc?.pid, startTime: proc?.startTime, scope: proc?.scope };
  };
  const upgrades: RecordUpgrades = {
    0: (raw) => {
      const { vmName, pid, startTime, scope, ...rest } = raw;
      return { ...rest, name: vmName, process: { pid, startTime, scope } };
    },
    ...RECORD_UPGRADES,
  };

  it('reads a schema 1 record (one installation, no channel) as channel "default"', () => {
    const { channel, ...v1 } = JSON.parse(text(sample())) as Record<string, unknown>;
    expect(channel).toBe('default');
    expect(parseRecord(JSON.stringify({ ...v1, schema: 1 }), 'web.json')).toEqual(sample());
    // A schema 1 record could not hold a channel: one written with it is not a real schema 1 record.
    expect(caught(() => parseRecord(JSON.stringify({ ...v1, schema: 1, policy: 'sometimes' }), 'web.json')).message).toContain('field "policy"');
  });

  it('brings an older record up to the current schema', () => {
    expect(RECORD_SCHEMA).toBe(6);
    const old = v0();
    const upgraded = upgradeRecord(old, upgrades, 'web.json');
    expect(upgraded.schema).toBe(6);
    expect(upgraded.name).toBe('web');
    expect(old.schema).toBe(0); // the input is left as it was
    expect(parseRecord(text(v0()), 'web.json', upgrades)).toEqual(sample());
  });

  it('reads a schema 3 record (no disk chains) as it was, and checks recorded chains', () => {
    const spec = validateSpec({ name: 'web', disks: [{ path: '/vm/web.qcow2', format: 'qcow2' }] });
    const withDisk = sample('web', { spec });
    expect(parseRecord(JSON.stringify({ ...JSON.parse(text(withDisk)), schema: 3 }), 'web.json')).toEqual(withDisk);
    const disks = [[
      { path: '/vm/web.qcow2', format: 'qcow2' as const, virtualSize: 1 << 30, dev: 2049, ino: 11 },
      { path: '/vm/base.raw', format: 'raw' as const, virtualSize: 1 << 30, dev: 2049, ino: 12 },
    ]];
    expect(parseRecord(text(sample('web', { spec, disks })), 'web.json').disks).toEqual(disks);
    const bad = { ...JSON.parse(text(sample('web', { spec, disks }))), disks: [[{ path: 'rel', format: 'vmdk', virtualSize: 1, dev: 1, ino: -1 }], []] };
    const message = caught(() => parseRecord(JSON.stringify(bad), 'web.json')).message;
    for (const field of ['"disks" has 2 chains for 1 disks', '"disks[0][0].path"', '"disks[0][0].format"', '"disks[0][0].ino"', '"disks[1]"']) expect(message).toContain(field);
  });

  it('reads a schema 5 record\'s user-mode NIC as not restricted, as it ran; keeps a recorded restrict', () => {
    const nic = { mode: 'user', hostForward: [{ protocol: 'tcp', host: '127.0.0.1:2222', guest: 22 }], mac: '52:54:00:00:00:01' };
    const open = sample('web', { spec: validateSpec({ name: 'web', kernel: '/boot/vmlinuz', nics: [nic] }) });
    const read = parseRecord(JSON.stringify({ ...JSON.parse(text(open)), schema: 5 }), 'web.json');
    expect(read).toEqual(open);
    expect(read.spec.nics?.[0]).not.toHaveProperty('restrict');
    const restricted = sample('web', { spec: validateSpec({ name: 'web', kernel: '/boot/vmlinuz', nics: [{ ...nic, restrict: true }] }) });
    expect(parseRecord(text(restricted), 'web.json').spec.nics?.[0]).toMatchObject({ restrict: true });
  });

  it('reads a schema 2 record (no autostart, no wanted) as it was, and checks the new fields', () => {
    expect(parseRecord(JSON.stringify({ ...JSON.parse(text(sample())), schema: 2 }), 'web.json')).toEqual(sample());
    expect(parseRecord(text(sample('web', { autostart: 'never', wanted: 'running' })), 'web.json')).toMatchObject({ autostart: 'never', wanted: 'running' });
    const err = caught(() => parseRecord(JSON.stringify({ ...JSON.parse(text(sample())), autostart: 'sometimes', wanted: 'yes' }), 'web.json'));
    expect(err.message).toContain('field "autostart" must be one of always, never, last-state');
    expect(err.message).toContain('field "wanted" must be running or stopped');
  });

  it('reads a schema 4 record (no NICs, no TAPs) as it was, and checks the new fields', () => {
    expect(parseRecord(JSON.stringify({ ...JSON.parse(text(sample())), schema: 4 }), 'web.json')).toEqual(sample());
    const proc = { pid: 42, startTime: '7', scope: 'vmkeep-web.scope' };
    const withTaps = sample('web', { process: { ...proc, taps: ['vk525400123456a'] } });
    expect(parseRecord(text(withTaps), 'web.json').process?.taps).toEqual(['vk525400123456a']);
    const err = caught(() => parseRecord(text(sample('web', { process: { ...proc, taps: ['eth0'] } })), 'web.json'));
    expect(err.message).toContain('field "process.taps" must be a list of vmkeep TAP names');
  });

  it('leaves a current record untouched', () => {
    const raw = JSON.parse(text(sample())) as Record<string, unknown>;
    expect(upgradeRecord(raw, upgrades)).toBe(raw);
  });

  it('refuses a schema it has no upgrade for, and a failing upgrade, as RECORD_CORRUPT', () => {
    expect(Object.keys(RECORD_UPGRADES)).toEqual(['1', '2', '3', '4', '5']);
    const missing = caught(() => parseRecord(text(v0()), 'web.json'));
    expect(missing.code).toBe('RECORD_CORRUPT');
    expect(missing.message).toMatch(/no upgrade from schema 0 to 1/);

    const failing = caught(() => upgradeRecord(v0(), { 0: () => { throw new Error('boom'); } }, 'web.json'));
    expect(failing.code).toBe('RECORD_CORRUPT');
    expect(failing.message).toMatch(/could not be upgraded from schema 0 to 1 \(boom\)/);

    // An upgrade that produces a bad shape is caught by validation afterwards.
    const sloppy = caught(() => parseRecord(text(v0()), 'web.json', { ...RECORD_UPGRADES, 0: (raw) => raw }));
    expect(sloppy.message).toContain('field "vmName"');
  });
});

describe('tempFileTarget', () => {
  it('recognises temp files and nothing else', () => {
    expect(tempFileTarget('.web.json.1234-0123456789abcdef.tmp')).toBe('web.json');
    expect(tempFileTarget('.vmkeepd.pid.1-fedcba9876543210.tmp')).toBe('vmkeepd.pid');
    for (const f of ['web.json', '.web.json', 'web.json.tmp', '.web.json.12-xyz.tmp', '.web.json.12-0123456789abcdef.tmp.json']) {
      expect(tempFileTarget(f)).toBeNull();
    }
  });
});

describe('RecordStore', () => {
  it('writes the lowest schema that holds the record: 5 unless a user-mode NIC says restrict', async () => {
    const store = new RecordStore(join(dir, 'vms'));
    await store.init();
    const schemaOnDisk = (name: string) => (JSON.parse(readFileSync(store.fileOf(name), 'utf8')) as { schema: number }).schema;
    const nics = (restrict?: boolean) => [{ mode: 'user', hostForward: [], ...(restrict === undefined ? {} : { restrict }) }];
    const spec = (name: string, restrict?: boolean) => validateSpec({ name, kernel: '/boot/vmlinuz', memoryMiB: 256, nics: nics(restrict) });
    await store.put(sample('open', { spec: spec('open') }));
    await store.put(sample('shut', { spec: spec('shut', true) }));
    await store.put(sample('said', { spec: spec('said', false) }));
    // A release that reads up to schema 5 (before restrict) still reads "open"; "shut" and
    // "said" it must refuse rather than start their NICs without knowing the field.
    expect([schemaOnDisk('open'), schemaOnDisk('shut'), schemaOnDisk('said')]).toEqual([5, 6, 6]);
    expect(await store.get('open')).toEqual(sample('open', { spec: spec('open') }));
    expect(await store.get('shut')).toEqual(sample('shut', { spec: spec('shut', true) }));
  });

  it('round-trips records through real files with private modes', async () => {
    const store = new RecordStore(join(dir, 'vms'));
    expect(await store.init()).toEqual([]);
    expect(statSync(store.dir).mode & 0o777).toBe(0o700);
    expect(await store.get('web')).toBeNull();
    await store.put(sample());
    await store.put(sample('db', { state: 'stopped' }));
    expect(await store.get('web')).toEqual(sample());
    expect(statSync(store.fileOf('web')).mode & 0o777).toBe(0o600);
    expect(parseRecord(readFileSync(store.fileOf('db'), 'utf8'), 'db.json').state).toBe('stopped');
    await store.put(sample('web', { state: 'paused' }));
    expect((await store.get('web'))?.state).toBe('paused');
    expect(readdirSync(store.dir).sort()).toEqual(['db.json', 'web.json']);
  });

  it('refuses names that are not VM names, before touching any file', async () => {
    const store = new RecordStore(dir);
    for (const name of ['../escape', 'a/b', '', 'Web', '.hidden']) {
      expect((await caughtAsync(store.get(name))).code).toBe('INVALID_REQUEST');
      expect((await caughtAsync(store.remove(name))).code).toBe('INVALID_REQUEST');
    }
  });

  it('refuses to write a record that would not read back, and writes nothing', async () => {
    const store = new RecordStore(dir);
    const bad = [
      sample('web', { state: 'flying' as never }),
      sample('web', { process: { pid: Number.NaN, startTime: '1', scope: null } }),
      sample('web', { name: '../x' }),
    ];
    for (const record of bad) {
      const err = await caughtAsync(store.put(record));
      expect(err.code).toBe('INTERNAL');
    }
    expect(readdirSync(dir)).toEqual([]);
  });

  it('removes a record durably; a missing one is fine', async () => {
    const store = new RecordStore(dir);
    await store.put(sample());
    await store.remove('web');
    await store.remove('web');
    expect(await store.get('web')).toBeNull();
    expect(readdirSync(dir)).toEqual([]);
  });

  it('throws the damage from get(): RECORD_CORRUPT and RECORD_TOO_NEW, file untouched', async () => {
    const store = new RecordStore(dir);
    writeFileSync(store.fileOf('web'), '{"schema": 1, "name": "we');
    expect((await caughtAsync(store.get('web'))).code).toBe('RECORD_CORRUPT');
    writeFileSync(store.fileOf('db'), text({ ...sample('db'), schema: 7 }));
    const tooNew = await caughtAsync(store.get('db'));
    expect(tooNew.code).toBe('RECORD_TOO_NEW');
    expect(tooNew.message).toContain(store.fileOf('db'));
    writeFileSync(store.fileOf('bin'), Buffer.from([0x7b, 0xff, 0xfe, 0x7d]));
    expect((await caughtAsync(store.get('bin'))).message).toMatch(/not UTF-8/);
    expect(readFileSync(store.fileOf('web'), 'utf8')).toBe('{"schema": 1, "name": "we');
  });

  it('list() returns the good records, reports the damaged ones and leaves them on disk', async () => {
    const store = new RecordStore(dir);
    await store.init();
    await store.put(sample('b'));
    await store.put(sample('a'));
    const damaged: Record<string, string> = {
      'c.json': text(sample('c')).slice(0, 200),
      'd.json': text({ ...sample('d'), schema: RECORD_SCHEMA + 1 }),
      'e.json': text(sample('other')),
      'Bad Name.json': text(sample()),
    };
    const ignored: Record<string, string> = {
      'notes.txt': 'hello',
      '.web.json.77-0123456789abcdef.tmp': 'half a rec',
      README: 'x',
    };
    for (const [f, content] of Object.entries({ ...damaged, ...ignored })) writeFileSync(join(dir, f), content);

    const { records, damaged: found } = await store.list();
    expect(records).toEqual([sample('a'), sample('b')]);
    expect(found.map((d) => [d.name, d.file, d.error.code])).toEqual([
      ['Bad Name', join(dir, 'Bad Name.json'), 'RECORD_CORRUPT'],
      ['c', join(dir, 'c.json'), 'RECORD_CORRUPT'],
      ['d', join(dir, 'd.json'), 'RECORD_TOO_NEW'],
      ['e', join(dir, 'e.json'), 'RECORD_CORRUPT'],
    ]);
    for (const d of found) expect(d.error.message).toContain(d.file);
    for (const [f, content] of Object.entries({ ...damaged, ...ignored })) expect(readFileSync(join(dir, f), 'utf8')).toBe(content);
  });

  it('concurrent puts of one record never collide: the last rename wins, no temp file remains', async () => {
    const store = new RecordStore(dir);
    const versions = Array.from({ length: 10 }, (_, i) => sample('web', { problem: `version ${i}` }));
    await Promise.all(versions.map((v) => store.put(v)));
    expect(versions).toContainEqual(await store.get('web'));
    expect(readdirSync(dir)).toEqual(['web.json']);
  });
});

// ---------------------------------------------------------------------------------------------
// Crash points of put(): the adapter throws at one step, and from then on behaves like a dead
// process (every later call fails too, so nothing is cleaned up).

type Step = 'create' | 'write' | 'write-half' | 'sync' | 'close' | 'rename' | 'syncDir';

class Crash extends Error {
  constructor(step: string) {
    super(`simulated crash at ${step}`);
  }
}

function crashingFs(at: Step, options: { dies: boolean }): RecordFs & { calls: string[] } {
  let dead = false;
  const calls: string[] = [];
  const gate = (step: string): void => {
    calls.push(step);
    if (dead) throw new Crash(`${step} after death`);
    if (step === at) {
      if (options.dies) dead = true;
      throw new Crash(step);
    }
  };
  return {
    calls,
    async mkdir(path, mode) {
      gate('mkdir');
      return nodeRecordFs.mkdir(path, mode);
    },
    async create(path, mode) {
      gate('create');
      const real = await nodeRecordFs.create(path, mode);
      const handle: RecordFileHandle = {
        async write(data) {
          if (at === 'write-half' && !dead) {
            await real.write(data.subarray(0, Math.floor(data.length / 2)));
          }
          gate(at === 'write-half' ? 'write-half' : 'write');
          return real.write(data);
        },
        async sync() {
          gate('sync');
          return real.sync();
        },
        async close() {
          // A dead process's descriptors are closed by the kernel: close the real one regardless.
          await real.close();
          gate('close');
        },
      };
      return handle;
    },
    async rename(from, to) {
      gate('rename');
      return nodeRecordFs.rename(from, to);
    },
    async unlink(path) {
      gate('unlink');
      return nodeRecordFs.unlink(path);
    },
    async readdir(path) {
      gate('readdir');
      return nodeRecordFs.readdir(path);
    },
    async readFile(path, max) {
      gate('readFile');
      return nodeRecordFs.readFile(path, max);
    },
    async syncDir(path) {
      gate('syncDir');
      return nodeRecordFs.syncDir(path);
    },
  };
}

const BEFORE_RENAME: Step[] = ['create', 'write', 'write-half', 'sync', 'close', 'rename'];
const STEPS: Step[] = [...BEFORE_RENAME, 'syncDir'];

describe('put() interrupted at each step', () => {
  const oldRecord = sample('web', { state: 'starting', problem: 'old '.repeat(2000) });
  const newRecord = sample('web', { state: 'running', problem: 'new '.repeat(3000) });

  function onDisk(): VmRecord | null {
    let content: string;
    try {
      content = readFileSync(join(dir, 'web.json'), 'utf8');
    } catch {
      return null;
    }
    return parseRecord(content, 'web.json');
  }

  it.each(STEPS)('a crash at %s leaves the complete old or new record; init() removes the leftovers', async (step) => {
    const real = new RecordStore(dir);
    await real.put(oldRecord);
    const crashing = crashingFs(step, { dies: true });
    const err = await caughtAsync(new RecordStore(dir, crashing).put(newRecord));
    expect(err.code).toBe('STATE_IO');
    expect(crashing.calls).toContain(step);

    expect(onDisk()).toEqual(BEFORE_RENAME.includes(step) ? oldRecord : newRecord);
    const leftovers = readdirSync(dir).filter((f) => f !== 'web.json');
    // A temp file exists from its creation until the rename.
    expect(leftovers).toHaveLength(step === 'create' || step === 'syncDir' ? 0 : 1);

    expect(await new RecordStore(dir).init()).toEqual(leftovers);
    expect(readdirSync(dir)).toEqual(['web.json']);
    expect(onDisk()).toEqual(BEFORE_RENAME.includes(step) ? oldRecord : newRecord);
  });

  it.each(BEFORE_RENAME)('a crash at %s before the first write of a record leaves no record', async (step) => {
    await caughtAsync(new RecordStore(dir, crashingFs(step, { dies: true })).put(newRecord));
    expect(onDisk()).toBeNull();
    await new RecordStore(dir).init();
    expect(readdirSync(dir)).toEqual([]);
  });

  it.each(BEFORE_RENAME)('an I/O error at %s (process lives on) keeps the old record and removes its temp file', async (step) => {
    await new RecordStore(dir).put(oldRecord);
    const err = await caughtAsync(new RecordStore(dir, crashingFs(step, { dies: false })).put(newRecord));
    expect(err.code).toBe('STATE_IO');
    expect(err.message).toMatch(/the previous content is unchanged/);
    expect(onDisk()).toEqual(oldRecord);
    expect(readdirSync(dir)).toEqual(['web.json']);
  });

  it('a failed folder fsync after the rename is reported: the new record is in place but not known durable', async () => {
    await new RecordStore(dir).put(oldRecord);
    const err = await caughtAsync(new RecordStore(dir, crashingFs('syncDir', { dies: false })).put(newRecord));
    expect(err.message).toMatch(/was replaced, but the fsync of folder/);
    expect(onDisk()).toEqual(newRecord);
  });
});
