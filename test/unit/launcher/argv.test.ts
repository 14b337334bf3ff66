import { describe, expect, it } from 'vitest';
import { buildQemuCommand, escapeQemuOptValue, validateSpec, type DiskLayer, type Installation } from '../../../launcher/index.js';

const UUID = '123e4567-e89b-12d3-a456-426614174000';
const system: Installation = { name: 'system', binary: '/usr/bin/qemu-system-x86_64', firmwareDirs: [] };
const paths = { qmpSocket: '/run/vmkeep/vm1/qmp.sock', serialLog: '/var/log/vmkeep/vm1.serial' };

function layer(path: string, format: 'raw' | 'qcow2', ino: number): DiskLayer {
  return { path, format, virtualSize: 1 << 20, dev: 1, ino };
}

describe('buildQemuCommand', () => {
  it('builds the exact command line of a kernel spec', () => {
    const spec = validateSpec({ name: 'vm1', kernel: '/g/vmlinuz', initrd: '/g/initramfs.gz', append: 'console=ttyS0 quiet panic=-1' });
    expect(buildQemuCommand({ spec, uuid: UUID, installation: system, machineType: 'pc-q35-7.2', paths, startPaused: false })).toEqual({
      binary: '/usr/bin/qemu-system-x86_64',
      argv: [
        '-name', 'guest=vm1',
        '-uuid', UUID,
        '-nodefaults', '-no-user-config', '-display', 'none', '-no-shutdown',
        '-machine', 'pc-q35-7.2,accel=tcg',
        '-cpu', 'qemu64',
        '-m', '256',
        '-smp', '1',
        '-qmp', 'unix:/run/vmkeep/vm1/qmp.sock,server=on,wait=off',
        '-add-fd', 'fd=3,set=3,opaque=serial0',
        '-chardev', 'file,id=serial0,path=/dev/fdset/3,append=on',
        '-serial', 'chardev:serial0',
        '-kernel', '/g/vmlinuz',
        '-initrd', '/g/initramfs.gz',
        '-append', 'console=ttyS0 quiet panic=-1',
      ],
      env: {},
      inheritedFds: [{ childFd: 3, source: { kind: 'log', path: '/var/log/vmkeep/vm1.serial', what: 'serial console log' } }],
    });
  });

  it('builds the exact command line of a disk spec on a relocated installation', () => {
    const spec = validateSpec({
      name: 'db', memoryMiB: 2048, vcpus: 2, accel: 'kvm', cpu: 'host',
      disks: [{ path: '/vm/root.qcow2', format: 'qcow2' }, { path: '/vm/seed.img', format: 'raw', readOnly: true }],
    });
    const installation: Installation = {
      name: 'snap', binary: '/snap/vmkeep/12/usr/bin/qemu-system-x86_64', moduleDir: '/snap/vmkeep/12/usr/lib/qemu',
      firmwareDirs: ['/snap/vmkeep/12/usr/share/qemu', '/snap/vmkeep/12/usr/share/seabios'],
    };
    const diskChains = [
      [layer('/vm/root.qcow2', 'qcow2', 11), layer('/vm/base.raw', 'raw', 12)],
      [layer('/vm/seed.img', 'raw', 13)],
    ];
    expect(buildQemuCommand({ spec, uuid: UUID, installation, machineType: 'pc-i440fx-7.2', paths, startPaused: true, incoming: 'defer', diskChains })).toEqual({
      binary: '/snap/vmkeep/12/usr/bin/qemu-system-x86_64',
      argv: [
        '-name', 'guest=db',
        '-uuid', UUID,
        '-nodefaults', '-no-user-config', '-display', 'none', '-no-shutdown',
        '-machine', 'pc-i440fx-7.2,accel=kvm',
        '-cpu', 'host',
        '-m', '2048',
        '-smp', '2',
        '-qmp', 'unix:/run/vmkeep/vm1/qmp.sock,server=on,wait=off',
        '-add-fd', 'fd=3,set=3,opaque=serial0',
        '-chardev', 'file,id=serial0,path=/dev/fdset/3,append=on',
        '-serial', 'chardev:serial0',
        '-L', '/snap/vmkeep/12/usr/share/qemu',
        '-L', '/snap/vmkeep/12/usr/share/seabios',
        '-add-fd', 'fd=4,set=4,opaque=disk0-layer1:/vm/base.raw',
        '-blockdev', '{"driver":"file","node-name":"disk0-layer1-file","filename":"/dev/fdset/4","read-only":true,"cache":{"direct":false,"no-flush":false},"discard":"ignore"}',
        '-blockdev', '{"driver":"raw","node-name":"disk0-layer1","file":"disk0-layer1-file","read-only":true,"cache":{"direct":false,"no-flush":false},"discard":"ignore"}',
        '-add-fd', 'fd=5,set=5,opaque=disk0:/vm/root.qcow2',
        '-blockdev', '{"driver":"file","node-name":"disk0-file","filename":"/dev/fdset/5","read-only":false,"cache":{"direct":false,"no-flush":false},"discard":"ignore"}',
        '-blockdev', '{"driver":"qcow2","node-name":"disk0","file":"disk0-file","read-only":false,"cache":{"direct":false,"no-flush":false},"discard":"ignore","backing":"disk0-layer1"}',
        '-device', 'virtio-blk-pci,id=virtio-disk0,drive=disk0,bootindex=0',
        '-add-fd', 'fd=6,set=6,opaque=disk1:/vm/seed.img',
        '-blockdev', '{"driver":"file","node-name":"disk1-file","filename":"/dev/fdset/6","read-only":true,"cache":{"direct":false,"no-flush":false},"discard":"ignore"}',
        '-blockdev', '{"driver":"raw","node-name":"disk1","file":"disk1-file","read-only":true,"cache":{"direct":false,"no-flush":false},"discard":"ignore"}',
        '-device', 'virtio-blk-pci,id=virtio-disk1,drive=disk1,bootindex=1',
        '-S',
        '-incoming', 'defer',
      ],
      env: { QEMU_MODULE_DIR: '/snap/vmkeep/12/usr/lib/qemu' },
      inheritedFds: [
        { childFd: 3, source: { kind: 'log', path: '/var/log/vmkeep/vm1.serial', what: 'serial console log' } },
        { childFd: 4, source: { kind: 'file', path: '/vm/base.raw', access: 'read-only', direct: false, identity: { dev: 1, ino: 12 }, what: 'disks[0] layer 1' } },
        { childFd: 5, source: { kind: 'file', path: '/vm/root.qcow2', access: 'read-write', direct: false, identity: { dev: 1, ino: 11 }, what: 'disks[0]' } },
        { childFd: 6, source: { kind: 'file', path: '/vm/seed.img', access: 'read-only', direct: false, identity: { dev: 1, ino: 13 }, what: 'disks[1]' } },
      ],
    });
  });

  it('escapes commas where QEMU parses option lists, and only there', () => {
    // Checked against QEMU 7.2: -qmp unix:, -add-fd opaque= split on ",";
    // -kernel, -initrd and -L take the path verbatim; -blockdev is JSON.
    const spec = validateSpec({ name: 'c', kernel: '/a,b/k', initrd: '/a,b/i', disks: [{ path: '/a,b/d,,.img', format: 'raw' }] });
    const { argv } = buildQemuCommand({
      spec, uuid: UUID, installation: { ...system, firmwareDirs: ['/fw,1'] }, machineType: 'pc-q35-7.2',
      paths: { qmpSocket: '/run/a,b/qmp.sock', serialLog: '/log/a,b.serial' }, startPaused: false,
      diskChains: [[layer('/a,b/d,,.img', 'raw', 1)]],
    });
    const after = (flag: string): string | undefined => argv[argv.indexOf(flag) + 1];
    expect(after('-qmp')).toBe('unix:/run/a,,b/qmp.sock,server=on,wait=off');
    expect(after('-add-fd')).toBe('fd=3,set=3,opaque=serial0');
    expect(argv).toContain('fd=4,set=4,opaque=disk0:/a,,b/d,,,,.img');
    // With a kernel, the disk is not a boot device.
    expect(after('-device')).toBe('virtio-blk-pci,id=virtio-disk0,drive=disk0');
    expect(after('-chardev')).toBe('file,id=serial0,path=/dev/fdset/3,append=on');
    expect(after('-kernel')).toBe('/a,b/k');
    expect(after('-initrd')).toBe('/a,b/i');
    expect(after('-L')).toBe('/fw,1');
    expect(escapeQemuOptValue('a,b,,c')).toBe('a,,b,,,,c');
  });

  it('adds -S and -incoming only when asked', () => {
    const spec = validateSpec({ name: 'p', kernel: '/k' });
    const base = { spec, uuid: UUID, installation: system, machineType: 'pc-q35-7.2', paths };
    const plain = buildQemuCommand({ ...base, startPaused: false }).argv;
    expect(plain).not.toContain('-S');
    expect(plain).not.toContain('-incoming');
    expect(buildQemuCommand({ ...base, startPaused: true }).argv.slice(-1)).toEqual(['-S']);
    expect(buildQemuCommand({ ...base, startPaused: false, incoming: 'defer' }).argv.slice(-2)).toEqual(['-incoming', 'defer']);
  });

  it('puts memfd-shared RAM in a shared memfd backend, with aux-ram-share only on a QEMU that knows it (>= 10.0)', () => {
    const spec = validateSpec({ name: 'p', kernel: '/k', memoryMiB: 1024, memory: { backend: 'memfd-shared' } });
    const base = { spec, uuid: UUID, installation: system, machineType: 'pc-q35-7.2', paths, startPaused: false };
    const on10 = buildQemuCommand({ ...base, version: '10.0.2' }).argv;
    expect(on10).toEqual(expect.arrayContaining(['-machine', 'pc-q35-7.2,accel=tcg,memory-backend=ram0,aux-ram-share=on']));
    expect(on10.slice(on10.indexOf('-object'), on10.indexOf('-object') + 2)).toEqual(['-object', 'memory-backend-memfd,id=ram0,size=1024M,share=on']);
    expect(buildQemuCommand({ ...base, version: '9.2.0' }).argv).toContain('pc-q35-7.2,accel=tcg,memory-backend=ram0');
    for (const backend of [undefined, 'anonymous']) {
      const plain = validateSpec({ name: 'p', kernel: '/k', ...(backend === undefined ? {} : { memory: { backend } }) });
      const argv = buildQemuCommand({ ...base, spec: plain, version: '10.0.2' }).argv;
      expect(argv).not.toContain('-object');
      expect(argv).toContain('pc-q35-7.2,accel=tcg');
    }
  });

  it('a cpr-transfer destination listens on both channels, cpr first, in the JSON form', () => {
    const spec = validateSpec({ name: 'p', kernel: '/k', memory: { backend: 'memfd-shared' } });
    const argv = buildQemuCommand({
      spec, uuid: UUID, installation: system, machineType: 'pc-q35-7.2', paths, startPaused: false, version: '10.0.2',
      incoming: { cprSocket: '/run/vmkeep/p/cpr-1.sock', mainSocket: '/run/vmkeep/p/migrate-1.sock' },
    }).argv;
    expect(argv.slice(-4)).toEqual([
      '-incoming', '{"channel-type":"cpr","addr":{"transport":"socket","type":"unix","path":"/run/vmkeep/p/cpr-1.sock"}}',
      '-incoming', '{"channel-type":"main","addr":{"transport":"socket","type":"unix","path":"/run/vmkeep/p/migrate-1.sock"}}',
    ]);
    expect(argv).not.toContain('-S');
  });

  it('refuses a malformed uuid or machine type instead of passing it to QEMU', () => {
    const spec = validateSpec({ name: 'p', kernel: '/k' });
    const base = { spec, installation: system, paths, startPaused: false };
    expect(() => buildQemuCommand({ ...base, uuid: 'nope', machineType: 'pc-q35-7.2' })).toThrow(expect.objectContaining({ code: 'INVALID_SPEC' }));
    expect(() => buildQemuCommand({ ...base, uuid: UUID, machineType: 'q35,accel=kvm' })).toThrow(/machine/);
  });
});
