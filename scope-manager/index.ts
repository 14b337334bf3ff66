// The public door of scope-manager: the only code in vmkeep that speaks D-Bus.
export {
  ScopeManager,
  scopeUnitName,
  resolveBusAddress,
  DEFAULT_SLICE,
  SCOPE_PREFIX,
  type ScopeManagerOptions,
  type CreateScopeOptions,
  type CreatedScope,
  type ScopeInfo,
  type ScopeSummary,
  type ScopeProperty,
} from './scope-manager.js';
export { ScopeError, type ScopeErrorCode } from './errors.js';
export { dbusNextBus, BusCallError, type BusConnection, type BusFactory, type BusCall, type BusSignal } from './bus.js';
export { systemdCgroupPath, cgroupIsScope, unitOfCgroupPath } from './cgroup.js';
export { MachineRegistry, MACHINE_SERVICE, type MachineToRegister, type RegisteredMachine, type BusCaller } from './machines.js';
