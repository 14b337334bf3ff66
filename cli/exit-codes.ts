// The exit codes of vmkeep and vmkeepd (no imports: every entry point loads this).
export const EXIT_CLEAN = 0;
export const EXIT_FAILED = 1;
/** The command line could not be parsed. */
export const EXIT_USAGE = 2;
/** The guest did not power off within the timeout and QEMU was quit. */
export const EXIT_POWEROFF_TIMEOUT = 3;
/** A second Ctrl-C quit QEMU without waiting for the guest. */
export const EXIT_FORCED = 130;
