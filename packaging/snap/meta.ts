// snap/snapcraft.yaml -> what snapcraft's prime step would write into meta/: snap.yaml, plus the
// build plan the local build (packaging/snap/build.sh) carries out for the parts. It understands
// exactly the keys this project uses and refuses any other, so a key added to snapcraft.yaml
// cannot be silently dropped from the locally built snap.
import { parseDocument, stringify } from 'yaml';

export class SnapMetaError extends Error {
  readonly code = 'SNAP_META_UNSUPPORTED';
  constructor(message: string) {
    super(message);
    this.name = 'SnapMetaError';
  }
}

/** One file of a `dump` part copied into the prime folder (organize: from -> to). */
export interface PrimeCopy {
  from: string;
  to: string;
}

export interface SnapBuildPlan {
  /** meta/snap.yaml */
  snapYaml: string;
  /** Hook names declared in snapcraft.yaml's hooks: (their scripts come from snap/hooks/). */
  declaredHooks: string[];
  /** The launcher part: files of its source folder and where they go in the prime folder. */
  launcher: { source: string; files: PrimeCopy[] };
  /** The qemu part's Debian packages and the paths it leaves out of the stage. */
  qemu: { packages: string[]; exclude: string[] };
  /** The node part's source URL (the build takes the same release from the npm registry). */
  nodeSource: string;
}

type Obj = Record<string, unknown>;

// Top-level keys copied into snap.yaml as they are.
const COPIED = ['name', 'title', 'version', 'summary', 'description', 'license', 'base', 'grade', 'confinement', 'system-usernames', 'environment'];
// Top-level keys the build consumes itself.
const CONSUMED = ['platforms', 'parts', 'apps', 'hooks'];
// apps.<name> keys snapd reads from snap.yaml with the same meaning.
const APP_KEYS = [
  'command', 'daemon', 'stop-command', 'start-timeout', 'stop-timeout', 'restart-condition', 'restart-delay', 'refresh-mode',
  'stop-mode', 'after', 'before', 'completer', 'environment', 'sockets', 'plugs',
];
const HOOK_KEYS = ['environment'];
const PARTS: Record<string, { plugin: string; keys: string[] }> = {
  node: { plugin: 'dump', keys: ['plugin', 'source', 'build-attributes', 'prime'] },
  vmkeep: { plugin: 'nil', keys: ['after', 'plugin', 'source', 'override-build'] },
  launcher: { plugin: 'dump', keys: ['plugin', 'source', 'organize'] },
  qemu: { plugin: 'nil', keys: ['plugin', 'stage-packages', 'build-attributes', 'stage'] },
};

function isObj(v: unknown): v is Obj {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function only(where: string, value: unknown, keys: string[]): Obj {
  if (!isObj(value)) throw new SnapMetaError(`${where} must be a mapping`);
  const unknown = Object.keys(value).filter((k) => !keys.includes(k));
  if (unknown.length > 0) {
    throw new SnapMetaError(
      `${where}: ${unknown.join(', ')} not understood by the local snap build (it knows ${keys.join(', ')}); ` +
        'teach packaging/snap/meta.ts what snapcraft does with it, or build with snapcraft',
    );
  }
  return value;
}

function strings(where: string, value: unknown): string[] {
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string')) throw new SnapMetaError(`${where} must be a list of strings`);
  return value as string[];
}

/** The plan for a snapcraft.yaml text; `version` overrides its version (test revisions). */
export function planSnapBuild(snapcraftYaml: string, options: { version?: string } = {}): SnapBuildPlan {
  // YAML 1.1, as snapcraft and snapd read it: socket-mode 0600 is octal there (decimal 600 in 1.2).
  const doc = parseDocument(snapcraftYaml, { uniqueKeys: true, version: '1.1' });
  if (doc.errors.length > 0) throw new SnapMetaError(`snapcraft.yaml does not parse: ${doc.errors[0]?.message ?? ''}`);
  const top = only('snapcraft.yaml', doc.toJS() as unknown, [...COPIED, ...CONSUMED]);

  const meta: Obj = {};
  for (const key of COPIED) if (top[key] !== undefined) meta[key] = top[key];
  if (options.version !== undefined) meta.version = options.version;

  // platforms -> architectures: the build-for of every platform (this build makes amd64 only).
  const platforms = only('platforms', top.platforms, ['amd64']);
  const archs = Object.entries(platforms).flatMap(([name, p]) => strings(`platforms.${name}.build-for`, only(`platforms.${name}`, p, ['build-on', 'build-for'])['build-for']));
  if (archs.length !== 1 || archs[0] !== 'amd64') throw new SnapMetaError(`platforms must build for amd64 only; got ${archs.join(', ')}`);
  meta.architectures = archs;

  const apps: Obj = {};
  for (const [name, app] of Object.entries(only('apps', top.apps, Object.keys(isObj(top.apps) ? top.apps : {})))) {
    const a = only(`apps.${name}`, app, APP_KEYS);
    if (typeof a.command !== 'string') throw new SnapMetaError(`apps.${name}.command must be a string`);
    apps[name] = a;
  }
  meta.apps = apps;

  const hooks = top.hooks === undefined ? {} : only('hooks', top.hooks, Object.keys(isObj(top.hooks) ? top.hooks : {}));
  for (const [name, hook] of Object.entries(hooks)) only(`hooks.${name}`, hook ?? {}, HOOK_KEYS);
  if (Object.keys(hooks).length > 0) meta.hooks = hooks;

  const parts = only('parts', top.parts, Object.keys(PARTS));
  for (const name of Object.keys(PARTS)) {
    const spec = PARTS[name]!;
    const part = only(`parts.${name}`, parts[name], spec.keys);
    if (part.plugin !== spec.plugin) throw new SnapMetaError(`parts.${name}.plugin must be ${spec.plugin} for the local build; got ${String(part.plugin)}`);
  }
  const launcherPart = parts.launcher as Obj;
  const organize = only('parts.launcher.organize', launcherPart.organize, Object.keys(isObj(launcherPart.organize) ? launcherPart.organize : {}));
  const files = Object.entries(organize).map(([from, to]) => {
    if (typeof to !== 'string' || from.includes('..') || to.includes('..')) throw new SnapMetaError(`parts.launcher.organize.${from} must be a path inside the snap`);
    return { from, to };
  });
  const qemuPart = parts.qemu as Obj;
  const exclude = strings('parts.qemu.stage', qemuPart.stage ?? []).map((s) => {
    if (!s.startsWith('-')) throw new SnapMetaError(`parts.qemu.stage: only exclusions (-path) are understood; got ${s}`);
    return s.slice(1);
  });
  const nodePart = parts.node as Obj;
  if (typeof nodePart.source !== 'string') throw new SnapMetaError('parts.node.source must be a URL');

  return {
    snapYaml: stringify(meta, { lineWidth: 0 }),
    declaredHooks: Object.keys(hooks),
    launcher: { source: String(launcherPart.source), files },
    qemu: { packages: strings('parts.qemu.stage-packages', qemuPart['stage-packages']), exclude },
    nodeSource: nodePart.source,
  };
}
