// One vmkeepd start under `node --cpu-prof`, inside a private systemd: where the time to READY
// goes. Each CPU sample is charged to the nearest frame of a package or of a vmkeep folder (so
// yargs' own layout code counts as yargs); samples with no such frame are Node's module loader,
// V8's compiler ("(program)"), the garbage collector or other Node internals.
import { existsSync, readFileSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { SystemdHost } from '../support/systemd-host.js';
import { waitUntil } from './common.js';

interface CallFrame {
  functionName: string;
  url: string;
  lineNumber?: number;
  columnNumber?: number;
}
interface ProfileNode {
  id: number;
  callFrame: CallFrame;
  children?: number[];
}
interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
  timeDeltas: number[];
}

export interface StartProfile {
  /** The daemon's own "vmkeepd ready" startupMs: from its process start to READY. */
  readyMs: number;
  /** Busy milliseconds up to READY, by owner, most first. */
  costs: Array<{ owner: string; ms: number }>;
}

/** A package, a vmkeep folder, or undefined for Node's and V8's own frames. */
function ownerOfPath(path: string): string | undefined {
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)\//.exec(path)?.[1];
  if (pkg !== undefined) return pkg;
  const own = /(?:^|\/)(cli|daemon|launcher|qmp|scope-manager|upgrade)\/[^/]+\.[jt]s$/.exec(path)?.[1];
  return own === undefined ? undefined : `vmkeep ${own}/`;
}

const BASE64 = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/';

/**
 * The sources of a bundle's code by generated line: for each line, [column, source] pairs
 * from its source map (the "mappings" VLQ fields 1 and 2), so a bundled frame is charged to the
 * module it came from.
 */
export function decodeSourceMap(map: { sources: string[]; mappings: string }): Array<Array<[number, string]>> {
  const lines: Array<Array<[number, string]>> = [];
  let source = 0;
  for (const line of map.mappings.split(';')) {
    const segments: Array<[number, string]> = [];
    let column = 0;
    for (const segment of line.split(',')) {
      if (segment === '') continue;
      const fields: number[] = [];
      let value = 0;
      let shift = 0;
      for (const char of segment) {
        const digit = BASE64.indexOf(char);
        value += (digit & 31) << shift;
        if (digit & 32) {
          shift += 5;
        } else {
          fields.push(value & 1 ? -(value >>> 1) : value >>> 1);
          value = 0;
          shift = 0;
        }
      }
      column += fields[0] ?? 0;
      if (fields.length >= 2) {
        source += fields[1] ?? 0;
        segments.push([column, map.sources[source] ?? '']);
      }
    }
    lines.push(segments);
  }
  return lines;
}

type SourceLookup = (url: string, line: number, column: number) => string | undefined;

/** Maps a frame of a bundle file to its original source path, from the bundle's `.map` beside it. */
function bundleSources(): SourceLookup {
  const maps = new Map<string, Array<Array<[number, string]>> | null>();
  return (url, line, column) => {
    if (!url.startsWith('file:') || !url.includes('/dist/bundle/')) return undefined;
    let decoded = maps.get(url);
    if (decoded === undefined) {
      try {
        decoded = decodeSourceMap(JSON.parse(readFileSync(new URL(`${url}.map`), 'utf8')) as { sources: string[]; mappings: string });
      } catch {
        decoded = null;
      }
      maps.set(url, decoded);
    }
    let found: string | undefined;
    for (const [col, src] of decoded?.[line] ?? []) {
      if (col > column) break;
      found = src;
    }
    return found ?? decoded?.[line]?.[0]?.[1];
  };
}

function ownerOfFrame(frame: CallFrame & { lineNumber?: number; columnNumber?: number }, lookup: SourceLookup): string | undefined {
  const source = lookup(frame.url, frame.lineNumber ?? 0, frame.columnNumber ?? 0);
  if (source !== undefined) return ownerOfPath(source) ?? 'vmkeep bundle (unmapped)';
  return frame.url.startsWith('file:') ? ownerOfPath(frame.url) : undefined;
}

function ownerOfLeaf(frame: CallFrame): string {
  if (frame.functionName === '(program)') return 'V8 compile and native code ("(program)")';
  if (frame.functionName === '(garbage collector)') return 'garbage collector';
  if (frame.url.startsWith('node:internal/modules')) return "Node's module loader";
  return 'Node internals';
}

/** Charges the samples taken in the first `untilMs` of the profile. */
export function chargeSamples(profile: CpuProfile, untilMs: number): Array<{ owner: string; ms: number }> {
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);
  const lookup = bundleSources();
  const ownerCache = new Map<number, string | null>();
  const ownerOf = (id: number): string => {
    const cached = ownerCache.get(id);
    if (cached !== undefined && cached !== null) return cached;
    let owner: string | undefined;
    for (let at: number | undefined = id; at !== undefined && owner === undefined; at = parent.get(at)) {
      const frame = byId.get(at)?.callFrame;
      owner = frame === undefined ? undefined : ownerOfFrame(frame, lookup);
    }
    const result = owner ?? ownerOfLeaf(byId.get(id)!.callFrame);
    ownerCache.set(id, result);
    return result;
  };
  const totals = new Map<string, number>();
  let t = 0;
  for (let i = 0; i < profile.samples.length; i++) {
    const delta = (profile.timeDeltas[i] ?? 0) / 1000;
    t += delta;
    if (t > untilMs) break;
    const node = byId.get(profile.samples[i]!);
    if (node === undefined || node.callFrame.functionName === '(idle)') continue;
    const owner = ownerOf(node.id);
    totals.set(owner, (totals.get(owner) ?? 0) + delta);
  }
  return [...totals.entries()].map(([owner, ms]) => ({ owner, ms })).sort((a, b) => b.ms - a.ms);
}

/** The one child process of `pid` (on the host's /proc). */
async function childOf(pid: number): Promise<number | undefined> {
  const text = await readFile(`/proc/${pid}/task/${pid}/children`, 'utf8').catch(() => '');
  const first = text.trim().split(/\s+/)[0];
  return first ? Number(first) : undefined;
}

/** Starts `node --cpu-prof VMKEEPD` inside the host, waits for READY in its log, stops it with SIGTERM. */
export async function profileDaemonStart(host: SystemdHost, vmkeepd: string, stateRoot: string): Promise<StartProfile> {
  const profDir = await mkdtemp(join(tmpdir(), 'vmkeep-prof-'));
  try {
    const child = host.spawnInside(process.execPath, [
      '--cpu-prof', `--cpu-prof-dir=${profDir}`, vmkeepd,
      '--state-dir', join(stateRoot, 'state'), '--runtime-dir', join(stateRoot, 'run'), '--socket', join(stateRoot, 'run', 'prof.sock'),
    ], { stdio: ['ignore', 'ignore', 'pipe'] });
    let log = '';
    child.stderr?.on('data', (chunk: Buffer) => (log += chunk.toString()));
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    let readyMs: number;
    let node: number | undefined;
    try {
      readyMs = await waitUntil('the profiled vmkeepd to log "vmkeepd ready"', 30_000, () => {
        for (const line of log.split('\n')) {
          if (!line.includes('"vmkeepd ready"')) continue;
          const ms = (JSON.parse(line) as { startupMs?: number }).startupMs;
          return typeof ms === 'number' ? ms : NaN;
        }
        return undefined;
      });
      // What follows READY (the staleness report) is left to finish: earlier builds registered
      // their SIGTERM handler only then, and died of a SIGTERM before it without a profile.
      await new Promise((resolve) => setTimeout(resolve, 1_000));
    } finally {
      // To Node itself (nsenter's child): a SIGTERM to nsenter does not reach it as the unit's would.
      node = child.pid === undefined ? undefined : await childOf(child.pid);
      if (node !== undefined) process.kill(node, 'SIGTERM');
      else if (child.pid !== undefined) process.kill(-child.pid, 'SIGKILL');
    }
    // `exited` is nsenter's end; the daemon itself writes its profile as it exits, a moment later.
    await exited;
    const profile = await waitUntil(`vmkeepd to write its CPU profile into ${profDir} after SIGTERM`, 15_000, async () => {
      const file = (await readdir(profDir)).find((f) => f.endsWith('.cpuprofile'));
      if (file === undefined) return undefined;
      try {
        return JSON.parse(await readFile(join(profDir, file), 'utf8')) as CpuProfile;
      } catch {
        return undefined; // still being written
      }
    }, 50).catch((error: unknown) => {
      throw new Error(`${(error as Error).message}; vmkeepd (host pid ${node ?? 'unknown'}) ${node !== undefined && existsSync(`/proc/${node}`) ? 'is still running' : 'is gone'}; its log:\n${log.slice(-2000)}`);
    });
    return { readyMs, costs: chargeSamples(profile, Number.isFinite(readyMs) ? readyMs : Infinity) };
  } finally {
    await rm(profDir, { recursive: true, force: true });
  }
}
