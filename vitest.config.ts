import { defineConfig } from 'vitest/config';

// Two projects: unit tests are pure and fast; integration tests drive a real QEMU and a
// real systemd, so they run one file at a time (two cores, shared machine) with long timeouts.
export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['test/unit/**/*.test.ts'],
          testTimeout: 10_000,
        },
      },
      {
        test: {
          name: 'integration',
          include: ['test/integration/**/*.test.ts'],
          testTimeout: 120_000,
          hookTimeout: 180_000,
          fileParallelism: false,
          globalSetup: ['test/support/build-once.ts'],
        },
      },
    ],
  },
});
