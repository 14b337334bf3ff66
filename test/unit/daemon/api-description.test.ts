// The OpenAPI document against the server's real routing table, both ways, and against the
// OpenAPI 3.0 schema itself (a real validator).
import { Validator } from '@seriousme/openapi-schema-validator';
import { describe, expect, it } from 'vitest';
import { apiDescription, API_EXTENSIONS, ROUTE_DOCS } from '../../../daemon/api-description.js';
import { routeTable } from '../../../daemon/api-server.js';
import { HTTP_STATUS } from '../../../daemon/errors.js';

const METHODS = new Set(['get', 'post', 'put', 'patch', 'delete']);

function documented(doc: Record<string, any>): string[] {
  return Object.entries(doc.paths as Record<string, Record<string, unknown>>)
    .flatMap(([path, item]) => Object.keys(item).filter((m) => METHODS.has(m)).map((m) => `${m.toUpperCase()} ${path}`))
    .sort();
}

describe('the OpenAPI document', () => {
  const doc = apiDescription('0.1.0-test');
  const served = routeTable().map((r) => `${r.method} ${r.path}`).sort();

  it('describes every route the server has, and no route it does not have', () => {
    const described = documented(doc);
    expect(served.filter((r) => !described.includes(r)), 'routes without a description').toEqual([]);
    expect(described.filter((r) => !served.includes(r)), 'descriptions without a route').toEqual([]);
    expect(Object.keys(ROUTE_DOCS).sort()).toEqual(served);
  });

  it('the check can fail: a route dropped from the table is found, both ways', () => {
    const fewer = served.filter((r) => r !== 'GET /1.0/operations');
    const described = documented(doc);
    expect(described.filter((r) => !fewer.includes(r))).toEqual(['GET /1.0/operations']);
  });

  it('is a valid OpenAPI 3.0 document', async () => {
    const result = await new Validator().validate(doc);
    expect(result.errors ?? []).toEqual([]);
    expect(result.valid).toBe(true);
  });

  it('the validator is not a rubber stamp: a broken document is refused', async () => {
    const broken = structuredClone(doc) as Record<string, any>;
    delete broken.paths['/1.0/vms'].get.responses;
    expect((await new Validator().validate(broken)).valid).toBe(false);
  });

  it('every error code it names is a real one with its HTTP status', () => {
    for (const [path, item] of Object.entries(doc.paths as Record<string, Record<string, any>>)) {
      for (const [method, op] of Object.entries(item)) {
        for (const [status, response] of Object.entries(op.responses as Record<string, { description: string }>)) {
          if (Number(status) < 400) continue;
          const codes = response.description.replace(/^error: /, '').split(', ');
          for (const code of codes) expect(HTTP_STATUS[code as keyof typeof HTTP_STATUS], `${method} ${path}: ${code}`).toBe(Number(status));
        }
      }
    }
  });

  it('long requests answer 202 with an operation and a Location header', () => {
    for (const path of ['/1.0/vms/{name}/start', '/1.0/vms/{name}/stop', '/1.0/vms/{name}/refresh', '/1.0/refresh']) {
      const ok = (doc.paths as any)[path].post.responses['202'];
      expect(ok.content['application/json'].schema).toEqual({ $ref: '#/components/schemas/Operation' });
      expect(ok.headers.Location).toBeDefined();
    }
  });

  it('names its extensions', () => {
    expect(API_EXTENSIONS).toEqual(expect.arrayContaining(['operations', 'events_filter', 'openapi', 'metrics', 'refresh_migrate_or_reboot']));
  });
});
