#!/usr/bin/env python3
"""Bare QEMU, no vmkeep: is a migration from the system's QEMU 7.2 to QEMU 10.0 under TCG sound?

Each round boots the tiny test guest (test/guest/build-guest.sh) on 7.2 with a qcow2 ext4 disk on
virtio-blk, waits for five fsynced records, migrates it over a unix socket to 10.0
(test/support/fetch-qemu-backports.sh) and watches the destination's console for a kernel BUG,
Oops or panic, or a second boot. Variants alternate round by round, so the host's noise is shared:
  base         live, as vmkeep copies (events on, max-bandwidth 4 GiB/s, downtime-limit 20 ms)
  stop         paused copy: stop on the source, migrate, cont on the destination
  noioeventfd  live, virtio-blk ioeventfd=off on both sides
  single       live, -accel tcg,thread=single on both sides

  python3 scripts/tcg-migration-repro.py GUEST_DIR BACKPORTS_ROOT OUT_DIR base,stop ROUNDS [WATCH_S]

One JSON line per round on stdout, a summary per variant at the end. A crashed round's folder
(both consoles) is kept in OUT_DIR; the others are removed. Results: ARCHITECTURE.md, "Paused copy".
"""
import collections, json, os, re, socket, subprocess, sys, time, shutil, statistics

GUEST = sys.argv[1]; ROOT10 = sys.argv[2]; OUT = sys.argv[3]
VARIANTS = sys.argv[4].split(','); ROUNDS = int(sys.argv[5]); WATCH = float(sys.argv[6]) if len(sys.argv) > 6 else 8
Q72 = '/usr/bin/qemu-system-x86_64'
Q10 = f'{ROOT10}/usr/bin/qemu-system-x86_64'
ENV10 = dict(os.environ, QEMU_MODULE_DIR=f'{ROOT10}/usr/lib/x86_64-linux-gnu/qemu')
FW10 = ['-L', f'{ROOT10}/usr/share/qemu', '-L', '/usr/share/seabios', '-L', '/usr/lib/ipxe/qemu']
TROUBLE = re.compile(r'(?:\bBUG\b|Oops|Kernel panic|RIP:|general protection fault)')
procs = []

class Qmp:
    def __init__(self, path, timeout=30):
        end = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX); self.s.connect(path); break
            except OSError:
                if time.time() > end: raise
                time.sleep(0.05)
        self.f = self.s.makefile('rw'); self.events = []
        json.loads(self.f.readline()); self.cmd('qmp_capabilities')
    def cmd(self, name, args=None):
        self.f.write(json.dumps({'execute': name, **({'arguments': args} if args else {})}) + '\n'); self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if 'event' in m: self.events.append(m); continue
            if 'error' in m: raise RuntimeError(f'{name}: {m["error"]}')
            return m['return']

def qemu(binary, env, fw, name, d, variant, incoming):
    accel = 'tcg,thread=single' if variant == 'single' else 'tcg'
    blk = 'virtio-blk-pci,id=virtio-disk0,drive=fmt0'
    if variant == 'noioeventfd': blk += ',ioeventfd=off'
    argv = [binary, '-name', f'guest={name}', '-nodefaults', '-no-user-config', '-display', 'none', '-no-shutdown',
            '-machine', f'pc-q35-7.2', '-accel', accel, '-cpu', 'qemu64', '-m', '128', '-smp', '1',
            '-qmp', f'unix:{d}/{name}.qmp,server=on,wait=off', '-serial', f'file:{d}/{name}.log', *fw,
            '-kernel', f'{GUEST}/vmlinuz', '-initrd', f'{GUEST}/initramfs.gz', '-append', 'console=ttyS0 quiet panic=-1',
            '-blockdev', json.dumps({'driver': 'file', 'node-name': 'file0', 'filename': f'{d}/disk.qcow2', 'cache': {'direct': False, 'no-flush': False}}),
            '-blockdev', json.dumps({'driver': 'qcow2', 'node-name': 'fmt0', 'file': 'file0', 'backing': None}),
            '-device', blk]
    if incoming: argv += ['-incoming', 'defer']
    p = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(f'{d}/{name}.err', 'w'))
    procs.append(p); return p

def read(path):
    try: return open(path, errors='replace').read()
    except FileNotFoundError: return ''

def wrote(text):
    m = re.findall(r'GUEST WROTE (\d+)', text); return int(m[-1]) if m else 0

def wait_for(pred, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if pred(): return
        time.sleep(0.05)
    raise TimeoutError(what)

def round_(i, variant):
    d = f'{OUT}/r{i}'; os.makedirs(d)
    shutil.copyfile(f'{OUT}/base.qcow2', f'{d}/disk.qcow2')
    src_variant = variant; dst_variant = variant
    src = qemu(Q72, os.environ, [], 'src', d, src_variant, False)
    wait_for(lambda: wrote(read(f'{d}/src.log')) >= 5 or 'DISK ERROR' in read(f'{d}/src.log'), 120, 'source writes')
    if 'DISK ERROR' in read(f'{d}/src.log'): raise RuntimeError('guest disk error')
    dst = qemu(Q10, ENV10, FW10, 'dst', d, dst_variant, True)
    s = Qmp(f'{d}/src.qmp'); t = Qmp(f'{d}/dst.qmp')
    s.cmd('migrate-set-capabilities', {'capabilities': [{'capability': 'events', 'state': True}]})
    s.cmd('migrate-set-parameters', {'max-bandwidth': 4 << 30, 'downtime-limit': 20})
    t.cmd('migrate-incoming', {'uri': f'unix:{d}/mig.sock'})
    before = wrote(read(f'{d}/src.log'))
    t0 = time.time()
    if variant == 'stop': s.cmd('stop')
    s.cmd('migrate', {'uri': f'unix:{d}/mig.sock'})
    while True:
        info = s.cmd('query-migrate')
        if info.get('status') in ('completed', 'failed', 'cancelled'): break
        time.sleep(0.01)
    if variant == 'stop':
        wait_for(lambda: t.cmd('query-status')['status'] != 'inmigrate', 30, 'dest loaded')
        t.cmd('cont')
    wall = (time.time() - t0) * 1000
    status = info.get('status'); down = info.get('downtime', -1)
    if variant == 'stop': down = wall
    src.kill()
    # Watch the destination: its console shows its own lines only.
    end = time.time() + WATCH
    while time.time() < end:
        txt = read(f'{d}/dst.log')
        if TROUBLE.search(txt) or 'GUEST DISK MOUNTED' in txt: time.sleep(1); break
        time.sleep(0.1)
    txt = read(f'{d}/dst.log')
    trouble = [l for l in txt.splitlines() if TROUBLE.search(l)]
    rebooted = 'GUEST DISK MOUNTED' in txt
    after = wrote(txt)
    crash = bool(trouble) or rebooted
    print(json.dumps({'round': i, 'variant': variant, 'status': status, 'downtime_ms': round(down), 'total_ms': info.get('total-time'),
                      'wall_ms': round(wall), 'before': before, 'after': after, 'crash': crash, 'rebooted': rebooted,
                      'trouble': trouble[:4]}), flush=True)
    dst.kill(); src.wait(); dst.wait()
    if not crash: shutil.rmtree(d)
    return {'variant': variant, 'crash': crash, 'pause_ms': round(down)}

os.makedirs(OUT, exist_ok=True)
if not os.path.exists(f'{OUT}/base.raw'):
    subprocess.run(['truncate', '-s', '64M', f'{OUT}/base.raw'], check=True)
    subprocess.run(['mkfs.ext4', '-q', '-F', f'{OUT}/base.raw'], check=True)
    subprocess.run(['qemu-img', 'convert', '-O', 'qcow2', f'{OUT}/base.raw', f'{OUT}/base.qcow2'], check=True)
results = collections.defaultdict(list)
try:
    for i in range(ROUNDS):
        v = VARIANTS[i % len(VARIANTS)]
        try: results[v].append(round_(i, v))
        except Exception as e: print(json.dumps({'round': i, 'variant': v, 'error': repr(e)}), flush=True)
        finally:
            for p in procs:
                if p.poll() is None: p.kill(); p.wait()
            procs.clear()
finally:
    for p in procs:
        if p.poll() is None: p.kill()
    for v, rs in results.items():
        print(json.dumps({'variant': v, 'migrations': len(rs), 'crashes': sum(r['crash'] for r in rs),
                          'pause_ms_median': statistics.median(r['pause_ms'] for r in rs), 'pause_ms_max': max(r['pause_ms'] for r in rs)}), flush=True)
