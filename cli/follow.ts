import { watch, type FSWatcher } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { StringDecoder } from 'node:string_decoder';

export interface FileFollower {
  /** Reads what is left, delivers the last partial line, and stops. */
  stop(): Promise<void>;
}

// inotify can coalesce or (on some file systems) miss changes; a slow poll backs it up.
const BACKUP_POLL_MS = 250;
const CHUNK_BYTES = 64 * 1024;

/**
 * Delivers each line appended to a file (like `tail -f`), from its start. The file must exist.
 * A guest console is untrusted text: lines are passed on as they are, only split.
 */
export async function followFile(path: string, onLine: (line: string) => void): Promise<FileFollower> {
  const handle: FileHandle = await open(path, 'r');
  const decoder = new StringDecoder('utf8');
  const buffer = Buffer.alloc(CHUNK_BYTES);
  let position = 0;
  let pending = '';
  let reading: Promise<void> = Promise.resolve();
  let stopped = false;

  const drain = async (): Promise<void> => {
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, CHUNK_BYTES, position);
      if (bytesRead === 0) return;
      position += bytesRead;
      pending += decoder.write(buffer.subarray(0, bytesRead));
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) onLine(line.replace(/\r$/, ''));
    }
  };
  // Reads are chained so two wake-ups never read the same bytes twice.
  const wake = (): void => {
    if (stopped) return;
    reading = reading.then(drain).catch(() => undefined);
  };

  const watcher: FSWatcher = watch(path, wake);
  watcher.on('error', () => undefined);
  const timer = setInterval(wake, BACKUP_POLL_MS);
  timer.unref();
  wake();

  return {
    async stop() {
      if (stopped) return;
      stopped = true;
      clearInterval(timer);
      watcher.close();
      await reading;
      await drain().catch(() => undefined);
      const rest = pending + decoder.end();
      if (rest !== '') onLine(rest);
      await handle.close();
    },
  };
}
