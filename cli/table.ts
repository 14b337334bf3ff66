import type { DaemonEvent, Operation, VmView } from '../daemon/index.js';

/** Control characters (terminal escapes) from a daemon or guest string are shown, not obeyed. */
export function printable(text: string): string {
  return text.replace(/[\u0000-\u001f\u007f-\u009f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** Columns two spaces apart, left-aligned; the last column is not padded. */
export function formatTable(header: readonly string[], rows: ReadonlyArray<readonly string[]>): string {
  const all = [header, ...rows].map((row) => row.map(printable));
  const widths = header.map((_, i) => Math.max(...all.map((row) => (row[i] ?? '').length)));
  return all
    .map((row) => row.map((cell, i) => (i === row.length - 1 ? cell : cell.padEnd(widths[i] ?? 0))).join('  ').trimEnd())
    .join('\n');
}

export function formatVmList(vms: readonly VmView[]): string {
  return formatTable(
    ['NAME', 'STATE', 'PID', 'QEMU', 'MACHINE', 'SCOPE'],
    vms.map((vm) => [vm.name, vm.state, vm.pid?.toString() ?? '-', vm.qemuVersion ?? '-', vm.machineType || '-', vm.scope ?? '-']),
  ) + vms.filter((vm) => vm.problem !== undefined).map((vm) => `\n${vm.name}: ${printable(vm.problem ?? '')}`).join('');
}

/** `key: value` lines, aligned; absent facts are left out rather than shown empty. */
export function formatVmStatus(vm: VmView): string {
  const lines: Array<[string, string | undefined]> = [
    ['name', vm.name],
    ['state', vm.state],
    ['problem', vm.problem],
    ['pid', vm.pid?.toString()],
    ['scope', vm.scope],
    ['qemu', vm.qemuVersion === undefined ? undefined : `${vm.qemuVersion} (installation ${vm.installation})`],
    ['installation', vm.qemuVersion === undefined ? vm.installation : undefined],
    ['machine', vm.machineType || undefined],
    ['memory', `${vm.spec.memoryMiB} MiB`],
    ['vcpus', String(vm.spec.vcpus)],
    ...(vm.spec.nics ?? []).flatMap((nic, i): Array<[string, string]> => [
      [`nic ${i}`, describeNic(nic, vm.taps)],
      ...(vm.nicProblems ?? []).filter((p) => p.nic === i).map((p): [string, string] => [`nic ${i} problem`, `${p.message}; fix: ${p.fix}`]),
    ]),
    ['uuid', vm.uuid],
    ['autostart', vm.autostart],
    ['last exit', vm.lastExit === undefined ? undefined : `${vm.lastExit.reason} at ${vm.lastExit.at}`],
    ['created', vm.createdAt],
    ['updated', vm.updatedAt],
  ];
  const present = lines.filter((line): line is [string, string] => line[1] !== undefined);
  const width = Math.max(...present.map(([key]) => key.length)) + 1;
  return present.map(([key, value]) => `${`${key}:`.padEnd(width)} ${printable(value)}`).join('\n');
}

/** `bridge br0, mac 52:54:00:..., tap vk...` or `user, mac ..., restricted, forwards tcp 127.0.0.1:2222 -> 22`. */
function describeNic(nic: NonNullable<VmView['spec']['nics']>[number], taps: readonly string[] | undefined): string {
  const mac = `mac ${nic.mac ?? '?'}`;
  if (nic.mode === 'user') {
    const forwards = nic.hostForward.map((f) => `${f.protocol} ${f.host} -> ${f.guest}`).join(', ');
    return `user, ${mac}${nic.restrict === true ? ', restricted' : ''}${forwards === '' ? '' : `, forwards ${forwards}`}`;
  }
  const tap = taps?.find((t) => t.startsWith(`vk${(nic.mac ?? '').replaceAll(':', '')}`));
  return `bridge ${nic.bridge}, ${mac}${tap === undefined ? '' : `, tap ${tap}`}`;
}

/** One event as one human line: time, VM, what happened. */
export function formatEvent(event: DaemonEvent): string {
  let what: string;
  switch (event.type) {
    case 'vm-state':
      what = `${event.previous ?? '?'} -> ${event.state ?? '?'}`;
      break;
    case 'vm-created':
      what = 'created';
      break;
    case 'vm-deleted':
      what = 'deleted';
      break;
    case 'refresh':
      what = `refresh ${event.step ?? '?'} (${event.job ?? '?'})`;
      break;
    default:
      what = String(event.type);
  }
  const message = event.message === undefined ? '' : `: ${event.message}`;
  return printable(`${event.time}  ${event.vm ?? 'vmkeepd'}  ${what}${message}`);
}

export function formatOperations(ops: readonly Operation[]): string {
  return formatTable(
    ['ID', 'KIND', 'VMS', 'STATUS', 'PROGRESS', 'BY', 'UPDATED'],
    ops.map((op) => [
      op.id, op.kind, op.vms.join(',') || '-', op.status, op.progress === undefined ? '-' : `${op.progress.done}/${op.progress.total}`,
      // Who began it: an operator may cancel only its own (README, "Security").
      op.startedBy === undefined ? '-' : op.startedBy.uid === undefined ? op.startedBy.level : `uid ${op.startedBy.uid}`,
      op.updatedAt,
    ]),
  );
}

/** One operation: its status line, then its error if it has one. */
export function formatOperation(op: Operation): string {
  const progress = op.progress === undefined ? '' : ` (${op.progress.done}/${op.progress.total} done${op.progress.failed > 0 ? `, ${op.progress.failed} failed` : ''})`;
  const line = printable(`${op.id}: ${op.kind} of ${op.vms.join(', ') || 'no VM'}: ${op.status}${progress}`);
  return op.error === undefined ? line : `${line}\n${printable(`[${op.error.code}] ${op.error.message}`)}`;
}
