// vmkeepd's lines as journal entries of the native protocol: which fields, and their encoding.
import { describe, expect, it } from 'vitest';
import { encodeJournalEntry, journalFields } from '../../../daemon/journal-native.js';

// The journal takes field names of upper-case letters, digits and '_', not starting with '_'
// or a digit, at most 64 characters.
const FIELD_NAME = /^[A-Z][A-Z0-9_]{0,63}$/;

describe('journal entry of a log line', () => {
  it('MESSAGE, PRIORITY, identifier, VM and the whole line; valid names only', () => {
    const line = '{"level":40,"time":1,"pid":42,"name":"vmkeepd","vm":"web1","msg":"set on_reboot"}\n';
    const fields = journalFields(line, 'vmkeepd');
    expect(fields).toEqual([
      ['MESSAGE', 'set on_reboot'],
      ['PRIORITY', '4'],
      ['SYSLOG_IDENTIFIER', 'vmkeepd'],
      ['SYSLOG_PID', '42'],
      ['VM', 'web1'],
      ['VMKEEP_JSON', line.slice(0, -1)],
    ]);
    for (const [name] of fields) expect(name).toMatch(FIELD_NAME);
  });

  it('OPERATION, CODE and ERRNO only when the line has them; the code of the error when the line has none', () => {
    const withErr = JSON.stringify({ level: 50, operation: 'op-7', err: { code: 'ENOENT', errno: -2, message: 'x' }, msg: 'failed' });
    expect(Object.fromEntries(journalFields(withErr, 'vmkeepd'))).toMatchObject({ PRIORITY: '3', OPERATION: 'op-7', CODE: 'ENOENT', ERRNO: '2' });
    const own = JSON.stringify({ level: 50, code: 'RECORD_DAMAGED', err: { code: 'ENOENT' }, msg: 'bad' });
    expect(Object.fromEntries(journalFields(own, 'vmkeepd'))['CODE']).toBe('RECORD_DAMAGED');
    const plain = Object.fromEntries(journalFields(JSON.stringify({ level: 30, msg: 'ready', vm: 7 }), 'vmkeepd'));
    // A logged field named `level` (an access level) does not change the priority.
    expect(Object.fromEntries(journalFields('{"level":40,"msg":"m","level":"admin"}', 'v'))['PRIORITY']).toBe('4');
    expect(Object.keys(plain)).toEqual(['MESSAGE', 'PRIORITY', 'SYSLOG_IDENTIFIER', 'VMKEEP_JSON']);
  });

  it("PRIORITY follows pino's level as the <N> prefix does; a line that is not JSON is sent whole, at info", () => {
    const priorities = [10, 20, 30, 40, 50, 60].map((level) => Object.fromEntries(journalFields(`{"level":${level},"msg":"m"}`, 'v'))['PRIORITY']);
    expect(priorities).toEqual(['7', '7', '6', '4', '3', '2']);
    expect(journalFields('not json\n', 'vmkeepd')).toEqual([['MESSAGE', 'not json'], ['PRIORITY', '6'], ['SYSLOG_IDENTIFIER', 'vmkeepd'], ['VMKEEP_JSON', 'not json']]);
  });

  it('encodes NAME=value lines, and a value with a newline in the binary-safe form', () => {
    expect(encodeJournalEntry([['MESSAGE', 'hello'], ['VM', 'web1']]).toString()).toBe('MESSAGE=hello\nVM=web1\n');
    const value = 'two\nlines é';
    const entry = encodeJournalEntry([['MESSAGE', value], ['PRIORITY', '4']]);
    const bytes = Buffer.byteLength(value);
    expect(bytes).toBe(12);
    const expected = Buffer.concat([Buffer.from('MESSAGE\n'), Buffer.from([bytes, 0, 0, 0, 0, 0, 0, 0]), Buffer.from(value), Buffer.from('\nPRIORITY=4\n')]);
    expect(entry.equals(expected)).toBe(true);
  });

  it('a message with a newline goes in the binary-safe form inside a whole entry', () => {
    const line = JSON.stringify({ level: 30, msg: 'a\nb' });
    const entry = encodeJournalEntry(journalFields(line, 'vmkeepd'));
    expect(entry.subarray(0, 8).toString()).toBe('MESSAGE\n');
    expect(entry.readBigUInt64LE(8)).toBe(3n);
    expect(entry.subarray(16, 20).toString()).toBe('a\nb\n');
    expect(entry.subarray(20).toString()).toBe(`PRIORITY=6\nSYSLOG_IDENTIFIER=vmkeepd\nVMKEEP_JSON=${line}\n`);
  });
});
