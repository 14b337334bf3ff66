import { describe, expect, it } from 'vitest';
import { cgroupIsScope, systemdCgroupPath, unitOfCgroupPath } from '../../../scope-manager/index.js';

describe('systemdCgroupPath', () => {
  it('reads the cgroup2 line on a unified host', () => {
    expect(systemdCgroupPath('0::/vmkeep.slice/vmkeep-vm1.scope\n')).toBe('/vmkeep.slice/vmkeep-vm1.scope');
  });

  it('prefers the cgroup2 line on a hybrid host', () => {
    const text = '9:name=systemd:/vmkeep.slice/vmkeep-vm1.scope\n4:memory:/\n0::/vmkeep.slice/vmkeep-vm1.scope\n';
    expect(systemdCgroupPath(text)).toBe('/vmkeep.slice/vmkeep-vm1.scope');
  });

  it('falls back to name=systemd on a legacy host, where the cgroup2 line stays /', () => {
    expect(systemdCgroupPath('1:name=systemd:/vmkeep.slice/vmkeep-vm1.scope\n0::/\n')).toBe('/vmkeep.slice/vmkeep-vm1.scope');
  });

  it('is null when neither line is there', () => {
    expect(systemdCgroupPath('4:memory:/x\n')).toBeNull();
  });
});

describe('cgroupIsScope', () => {
  it('accepts the scope directly in its slice, also under a cgroup namespace prefix or nested slices', () => {
    expect(cgroupIsScope('/vmkeep.slice/vmkeep-vm1.scope', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(true);
    expect(cgroupIsScope('/host/vmkeep.slice/vmkeep-vm1.scope', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(true);
    expect(cgroupIsScope('/machine.slice/machine-vms.slice/vmkeep-vm1.scope', 'machine-vms.slice', 'vmkeep-vm1.scope')).toBe(true);
  });

  it('rejects other cgroups, including a sub-cgroup and a look-alike name', () => {
    expect(cgroupIsScope('/system.slice/vmkeepd.service', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(false);
    expect(cgroupIsScope('/vmkeep.slice/vmkeep-vm1.scope/sub', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(false);
    expect(cgroupIsScope('/vmkeep.slice/xvmkeep-vm1.scope', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(false);
    expect(cgroupIsScope('/other.slice/vmkeep-vm1.scope', 'vmkeep.slice', 'vmkeep-vm1.scope')).toBe(false);
  });
});

describe('unitOfCgroupPath', () => {
  it('names the unit whose own cgroup it is', () => {
    expect(unitOfCgroupPath('/vmkeep.slice/vmkeep-vm1.scope')).toBe('vmkeep-vm1.scope');
    expect(unitOfCgroupPath('/init.scope')).toBe('init.scope');
    expect(unitOfCgroupPath('/system.slice/vmkeepd.service')).toBe('vmkeepd.service');
  });

  it('leaves cgroups no unit is named after to systemd', () => {
    expect(unitOfCgroupPath('/vmkeep.slice/vmkeep-vm1.scope/inner')).toBeUndefined();
    expect(unitOfCgroupPath('/')).toBeUndefined();
    expect(unitOfCgroupPath('/vmkeep.slice')).toBeUndefined();
  });
});
