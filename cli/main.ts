#!/usr/bin/env node
// The `vmkeep` command (package.json bin): runs the bundle when the build made one.
import { programUrl } from './load-program.js';

await import(programUrl(import.meta.url, 'vmkeep', './vmkeep-program.js'));
