// Public door of the upgrade component: installations config, staleness, refresh policy and
// the mechanics of a live migration and a rolling refresh.
export { UpgradeError, type UpgradeErrorCode } from './errors.js';
export { compareQemuVersions } from './version.js';
export {
  parseInstallationsConfig, loadInstallationsConfig, singleInstallation, currentInstallation, DEFAULT_CHANNEL,
  type InstallationsConfig,
} from './config.js';
export { assessStaleness, type Staleness, type StalenessInput } from './staleness.js';
export {
  parseStrategy, checkRefreshTarget, policyOutcome, cprBlocker, chooseLiveStrategy, pausedCopyReason, TCG_LIVE_COPY_SOUND_FROM, REFRESH_STRATEGIES, type RefreshStrategy,
} from './policy.js';
export { pinModuleDir, collectPinnedModules, pinnedModuleDirName } from './modules.js';
export { migrateLive, cprTransfer, decideMigration, type LiveMigrationOptions, type CprTransferOptions, type MigrationResult } from './migrate.js';
export { runRolling, type RollingItemResult, type RollingOptions } from './rolling.js';
