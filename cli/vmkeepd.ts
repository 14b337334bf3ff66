#!/usr/bin/env node
// The `vmkeepd` daemon (package.json bin): runs the bundle when the build made one.
import { programUrl } from './load-program.js';

await import(programUrl(import.meta.url, 'vmkeepd', './vmkeepd-program.js'));
