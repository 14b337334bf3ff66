// GET /1.0/events?type=vm,refresh&vm=web1: which events a subscriber wants (pure).
import { describeValue, isValidVmName, VM_NAME_RULE } from '../launcher/index.js';
import { DaemonError } from './errors.js';
import { EVENT_TYPES, type DaemonEvent, type DaemonEventType } from './model.js';

/** Names a filter may use besides the event types themselves: "vm" is every vm-* event. */
const GROUPS: Readonly<Record<string, readonly DaemonEventType[]>> = {
  vm: EVENT_TYPES.filter((t) => t.startsWith('vm-')),
};

export const EVENT_FILTER_TYPES: readonly string[] = [...Object.keys(GROUPS), ...EVENT_TYPES];

/**
 * The predicate of a query: `type` (comma list of event types or groups) and `vm` (comma list
 * of VM names; an event matches when it is about one of them, an operation's when one of its
 * VMs is). No parameter: everything. A value that names nothing is INVALID_REQUEST.
 */
export function parseEventFilter(query: URLSearchParams): (event: DaemonEvent) => boolean {
  const unknownParam = [...query.keys()].find((key) => key !== 'type' && key !== 'vm');
  if (unknownParam !== undefined) throw invalid(`unknown query parameter ${JSON.stringify(unknownParam.slice(0, 64))}; the events take type=... and vm=...`);
  const types = listOf(query, 'type');
  const vms = listOf(query, 'vm');
  let wantedTypes: Set<string> | undefined;
  if (types !== undefined) {
    wantedTypes = new Set();
    for (const type of types) {
      const group = GROUPS[type] ?? ((EVENT_TYPES as readonly string[]).includes(type) ? [type] : undefined);
      if (group === undefined) throw invalid(`unknown event type ${JSON.stringify(type.slice(0, 64))}; known: ${EVENT_FILTER_TYPES.join(', ')}`);
      for (const t of group) wantedTypes.add(t);
    }
  }
  if (vms !== undefined) {
    const bad = vms.find((vm) => !isValidVmName(vm));
    if (bad !== undefined) throw invalid(`${describeValue(bad)} is not a valid VM name: VM names are ${VM_NAME_RULE}`);
  }
  return (event) => {
    if (wantedTypes !== undefined && !wantedTypes.has(event.type)) return false;
    if (vms === undefined) return true;
    return vms.some((vm) => event.vm === vm || event.vms?.includes(vm) === true);
  };
}

/** Every value of a repeated or comma-separated parameter; undefined when it is absent. */
function listOf(query: URLSearchParams, key: string): string[] | undefined {
  const raw = query.getAll(key);
  if (raw.length === 0) return undefined;
  const values = raw.flatMap((v) => v.split(',')).map((v) => v.trim()).filter((v) => v !== '');
  if (values.length === 0) throw invalid(`${key}= needs a value (a comma-separated list)`);
  return values;
}

function invalid(message: string): DaemonError {
  return new DaemonError('INVALID_REQUEST', message);
}
