import { execFileSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { checkSpecFiles, LaunchError, validateSpec, validateSpecAndFiles, type SpecProblem } from '../../../launcher/index.js';

const kernelSpec = { name: 'vm1', kernel: '/boot/vmlinuz' };

function problemsOf(input: unknown): SpecProblem[] {
  try {
    validateSpec(input);
  } catch (err) {
    expect(err).toBeInstanceOf(LaunchError);
    expect((err as LaunchError).code).toBe('INVALID_SPEC');
    return [...(err as LaunchError).problems];
  }
  throw new Error(`expected ${JSON.stringify(input)} to be rejected`);
}

function fieldsOf(input: unknown): string[] {
  return problemsOf(input).map((p) => p.field);
}

describe('validateSpec', () => {
  it('fills in defaults for a minimal kernel spec', () => {
    expect(validateSpec(kernelSpec)).toEqual({
      name: 'vm1', memoryMiB: 256, vcpus: 1, machine: 'q35', accel: 'tcg', cpu: 'qemu64', kernel: '/boot/vmlinuz', disks: [],
    });
  });

  it('keeps every given field and normalises disks and uuid', () => {
    const spec = validateSpec({
      name: 'web-1.prod_a', memoryMiB: 1024, vcpus: 4, machine: 'pc-q35-7.2', accel: 'kvm', cpu: 'Skylake-Client-v4',
      kernel: '/k', initrd: '/i', append: 'console=ttyS0', uuid: 'ABCDEF01-2345-6789-ABCD-EF0123456789',
      disks: [{ path: '/d/a.qcow2', format: 'qcow2' }, { path: '/d/b.img', format: 'raw', readOnly: true }],
    });
    expect(spec).toEqual({
      name: 'web-1.prod_a', memoryMiB: 1024, vcpus: 4, machine: 'pc-q35-7.2', accel: 'kvm', cpu: 'Skylake-Client-v4',
      kernel: '/k', initrd: '/i', append: 'console=ttyS0', uuid: 'abcdef01-2345-6789-abcd-ef0123456789',
      disks: [
        { path: '/d/a.qcow2', format: 'qcow2', readOnly: false, cache: 'writeback', discard: false },
        { path: '/d/b.img', format: 'raw', readOnly: true, cache: 'writeback', discard: false },
      ],
    });
    // A validated spec validates to itself (records can be re-checked when read back).
    expect(validateSpec(spec)).toEqual(spec);
  });

  it('keeps cache and discard of a disk', () => {
    expect(validateSpec({ name: 'd', disks: [{ path: '/x.raw', format: 'raw', cache: 'none', discard: true }] }).disks)
      .toEqual([{ path: '/x.raw', format: 'raw', readOnly: false, cache: 'none', discard: true }]);
  });

  it('accepts a disk-only spec', () => {
    expect(validateSpec({ name: 'd', disks: [{ path: '/x.raw', format: 'raw' }] }).kernel).toBeUndefined();
  });

  it.each([
    ['', 'is empty'],
    ['a'.repeat(64), 'the limit is 63'],
    ['has space', '" "'],
    ['a/b', '"/"'],
    ['Upper', '"U"'],
    ['.hidden', 'starts with "."'],
    ['-dash', 'starts with "-"'],
    ['a..b', '".."'],
  ])('rejects the name %j', (name, text) => {
    const [problem] = problemsOf({ ...kernelSpec, name });
    expect(problem?.field).toBe('name');
    expect(problem?.message).toContain(text);
  });

  it('accepts a 63-character name', () => {
    expect(validateSpec({ ...kernelSpec, name: 'a'.repeat(63) }).name).toHaveLength(63);
  });

  it('requires a name', () => {
    expect(problemsOf({ kernel: '/k' })).toEqual([expect.objectContaining({ field: 'name', message: 'is required' })]);
  });

  it.each([
    [{ memoryMiB: 15 }, 'memoryMiB'],
    [{ memoryMiB: 1_048_577 }, 'memoryMiB'],
    [{ memoryMiB: 256.5 }, 'memoryMiB'],
    [{ memoryMiB: '256' }, 'memoryMiB'],
    [{ vcpus: 0 }, 'vcpus'],
    [{ vcpus: 65 }, 'vcpus'],
    [{ accel: 'hvf' }, 'accel'],
    [{ machine: 'q35,accel=kvm' }, 'machine'],
    [{ machine: '' }, 'machine'],
    [{ cpu: 'qemu64,+vmx' }, 'cpu'],
    [{ uuid: 'not-a-uuid' }, 'uuid'],
    [{ kernel: 'vmlinuz' }, 'kernel'],
    [{ initrd: 'relative/initrd' }, 'initrd'],
    [{ append: 'x'.repeat(2049) }, 'append'],
  ])('rejects %j', (patch, field) => {
    expect(fieldsOf({ ...kernelSpec, ...patch })).toEqual([field]);
  });

  it('accepts the range limits', () => {
    const spec = validateSpec({ ...kernelSpec, memoryMiB: 16, vcpus: 64 });
    expect([spec.memoryMiB, spec.vcpus]).toEqual([16, 64]);
    expect(validateSpec({ ...kernelSpec, memoryMiB: 1_048_576 }).memoryMiB).toBe(1_048_576);
  });

  it('needs a kernel or a disk, and initrd/append only with a kernel', () => {
    expect(fieldsOf({ name: 'a' })).toEqual(['kernel']);
    expect(fieldsOf({ name: 'a', disks: [] })).toEqual(['kernel']);
    expect(fieldsOf({ name: 'a', initrd: '/i', append: 'x', disks: [{ path: '/d', format: 'raw' }] })).toEqual(['initrd', 'append']);
  });

  it('checks each disk', () => {
    const problems = problemsOf({
      name: 'a',
      disks: [
        { path: 'rel.img', format: 'raw' },
        { path: '/b.img', format: 'vmdk', readOnly: 'yes' },
        { format: 'raw', bootindex: 1 },
        '/c.img',
        { path: '/b.img', format: 'raw' },
        { path: '/e.img', format: 'raw', cache: 'unsafe', discard: 'on' },
      ],
    });
    expect(problems.map((p) => p.field)).toEqual([
      'disks[0].path', 'disks[1].format', 'disks[1].readOnly', 'disks[2].bootindex', 'disks[2].path', 'disks[3]', 'disks[4].path',
      'disks[5].cache', 'disks[5].discard',
    ]);
    expect(problems[1]?.fix).toContain('set "format" explicitly');
    expect(problems[6]?.message).toContain('same file as disks[1].path');
    expect(problems[7]?.fix).toContain('"none" (O_DIRECT)');
  });

  it('rejects unknown fields and suggests the close known one', () => {
    const [problem] = problemsOf({ ...kernelSpec, memoryMB: 512 });
    expect(problem).toEqual({ field: 'memoryMB', message: 'is not a known field', fix: 'remove it, or did you mean "memoryMiB"?' });
    expect(problemsOf({ ...kernelSpec, zzzzzzzz: 1 })[0]?.fix).toContain('known fields: name, memoryMiB');
  });

  it('takes memory.backend anonymous or memfd-shared, and leaves it out when not given (decided at create)', () => {
    expect(validateSpec(kernelSpec).memory).toBeUndefined();
    for (const backend of ['anonymous', 'memfd-shared']) expect(validateSpec({ ...kernelSpec, memory: { backend } }).memory).toEqual({ backend });
    expect(problemsOf({ ...kernelSpec, memory: 512 })[0]).toMatchObject({ field: 'memory', message: 'must be an object, got number 512' });
    expect(problemsOf({ ...kernelSpec, memory: 512 })[0]?.fix).toContain('the size is memoryMiB');
    expect(problemsOf({ ...kernelSpec, memory: { backend: 'hugepages' } })[0]).toMatchObject({ field: 'memory.backend' });
    expect(problemsOf({ ...kernelSpec, memory: {} })[0]).toMatchObject({ field: 'memory.backend', message: 'is required' });
    expect(problemsOf({ ...kernelSpec, memory: { backend: 'anonymous', size: 1 } })[0]).toMatchObject({ field: 'memory.size' });
  });

  it('rejects a non-object', () => {
    for (const input of [null, 'vm1', [kernelSpec], 42]) expect(fieldsOf(input)).toEqual(['spec']);
  });

  it('reports every problem at once, each with its field and a fix', () => {
    let error: LaunchError | undefined;
    try {
      validateSpec({ name: 'Bad Name', memoryMiB: 1, vcpus: 100, accel: 'xen', kernel: 'vmlinuz', extra: true });
    } catch (err) {
      error = err as LaunchError;
    }
    expect(error?.problems.map((p) => p.field)).toEqual(['extra', 'name', 'memoryMiB', 'vcpus', 'accel', 'kernel']);
    const lines = error?.message.split('\n') ?? [];
    expect(lines[0]).toBe('invalid VM spec (6 problems):');
    expect(lines).toContain('  memoryMiB: 1 is out of range; fix: use a whole number of MiB of guest RAM from 16 to 1048576 (default 256)');
    for (const problem of error?.problems ?? []) {
      expect(error?.message).toContain(`  ${problem.field}: ${problem.message}; fix: ${problem.fix}`);
    }
  });
});

describe('checkSpecFiles', () => {
  let dir: string | undefined;
  afterEach(async () => {
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
    dir = undefined;
  });

  it('refuses a FIFO, a device and a file that is not a kernel at once, without blocking on the FIFO', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-spec-'));
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const text = join(dir, 'notes.txt');
    await writeFile(text, 'not a kernel at all, just some words that are long enough '.repeat(20));
    const problems = async (kernel: string): Promise<string> =>
      checkSpecFiles(validateSpec({ name: 'a', kernel })).then(() => 'accepted', (err: unknown) => (err as LaunchError).message);
    expect(await problems(fifo)).toContain('is not a regular file');
    expect(await problems('/dev/zero')).toContain('is not a regular file');
    expect(await problems(text)).toContain('is not a Linux kernel image');
  });

  it('passes when every file exists and lists every missing one otherwise', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-spec-'));
    const kernel = join(dir, 'vmlinuz');
    const disk = join(dir, 'disk.img');
    await writeFile(kernel, bzImageHeader());
    await writeFile(disk, 'd');
    await expect(checkSpecFiles(validateSpec({ name: 'a', kernel, disks: [{ path: disk, format: 'raw' }] }))).resolves.toBeUndefined();

    const spec = validateSpec({ name: 'a', kernel, initrd: join(dir, 'nope.gz'), disks: [{ path: dir, format: 'raw' }] });
    const error = await checkSpecFiles(spec).then(() => undefined, (err: unknown) => err as LaunchError);
    expect(error?.code).toBe('FILE_NOT_FOUND');
    expect(error?.message).toContain(`initrd: ${join(dir, 'nope.gz')} does not exist`);
    expect(error?.message).toContain(`disks[0].path: ${dir} is a directory`);
    expect(error?.message).not.toContain('kernel:');
  });

  it('validateSpecAndFiles: missing files come with the other problems, in one INVALID_SPEC error', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-spec-'));
    const error = await validateSpecAndFiles({ name: 'a', vcpus: 0, kernel: join(dir, 'vmlinuz'), disks: [{ path: join(dir, 'd.img'), format: 'vmdk' }] })
      .then(() => undefined, (err: unknown) => err as LaunchError);
    expect(error?.code).toBe('INVALID_SPEC');
    expect(error?.problems.map((p) => p.field).sort()).toEqual(['disks[0].format', 'disks[0].path', 'kernel', 'vcpus']);
    expect(error?.message).toContain(`kernel: ${join(dir, 'vmlinuz')} does not exist`);
  });

  it('validateSpecAndFiles: a valid spec with missing files still fails with FILE_NOT_FOUND; a good one passes', async () => {
    dir = await mkdtemp(join(tmpdir(), 'vmkeep-spec-'));
    const kernel = join(dir, 'vmlinuz');
    await expect(validateSpecAndFiles({ name: 'a', kernel })).rejects.toMatchObject({ code: 'FILE_NOT_FOUND' });
    await writeFile(kernel, bzImageHeader());
    await expect(validateSpecAndFiles({ name: 'a', kernel })).resolves.toMatchObject({ name: 'a', kernel });
  });
});

/** The smallest file with an x86 Linux boot header ("HdrS" at 0x202). */
function bzImageHeader(): Buffer {
  const header = Buffer.alloc(0x210);
  header.write('HdrS', 0x202, 'latin1');
  return header;
}
