// Parses the Prometheus text format with the Prometheus project's own parser (the Python
// client's, Debian package python3-prometheus-client), so the metrics are checked by a reader
// that is not ours.
import { execa } from 'execa';

export interface ParsedFamily {
  name: string;
  type: string;
  help: string;
  samples: Array<{ name: string; labels: Record<string, string>; value: number }>;
}

// Non-finite values become strings in JSON; none of ours is non-finite.
const PARSER = `
import json, sys
try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:
    sys.exit("python3-prometheus-client is missing: apt-get install python3-prometheus-client")
out = [{"name": f.name, "type": f.type, "help": f.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
       for f in text_string_to_metric_families(sys.stdin.read())]
json.dump(out, sys.stdout)
`;

/** Throws with the parser's own message when the text is not valid exposition format. */
export async function parsePrometheus(text: string): Promise<ParsedFamily[]> {
  // Debian's python3, the one its python3-* packages install for (not a PATH-first pyenv).
  const run = await execa('/usr/bin/python3', ['-c', PARSER], { input: text, reject: false });
  if (run.exitCode !== 0) throw new Error(`the Prometheus parser refused the text (${run.stderr.trim().split('\n').at(-1) ?? ''}):\n${text}`);
  return JSON.parse(run.stdout) as ParsedFamily[];
}

/** The value of one sample, by its full name and exact labels; undefined when there is none. */
export function sampleValue(families: readonly ParsedFamily[], name: string, labels: Record<string, string> = {}): number | undefined {
  const want = JSON.stringify(Object.entries(labels).sort());
  for (const family of families) {
    for (const s of family.samples) if (s.name === name && JSON.stringify(Object.entries(s.labels).sort()) === want) return s.value;
  }
  return undefined;
}
