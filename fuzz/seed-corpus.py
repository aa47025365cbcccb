#!/usr/bin/env python3
"""Builds the fuzz targets' seed corpora at run time, outside version control.

Usage: fuzz/seed-corpus.py [PEER_DATA [OUT]]
  PEER_DATA defaults to ../shared/peer-data beside the project root, OUT to fuzz/corpus
  (git-ignored). Nothing from PEER_DATA is ever committed: its qemu-server and util-linux files
  carry GPL/AGPL licences (see its README.md).

Per target (OUT/<target>/, one file per seed, named by content hash):
  profile   the project's profiles/*.yaml and every ```yaml block of docs/profile.md
  vmconfig  every VM config of PEER_DATA/qemu-server (cfg2cmd, parse-config-input,
            restore-config-input, snapshot-input, pve-docs, real-world; not the expected
            command lines)
  cpuset    every row of PEER_DATA/cpulist-vectors.md (input with its nbits), and every
            cpulist / cpumask file (cpulist, cpumap, online, possible, present, *_list,
            *siblings, shared_cpu_map, ...) inside the hwloc and util-linux-lscpu archives
  procstat  /proc/<pid>/stat files inside those archives, plus this machine's own
            /proc/<pid>/stat and /proc/<pid>/task/<tid>/stat (real kernel output)
  ledger    fuzz/seeds/ledger/* (written for this crate from the ledger format)
  qmp       fuzz/seeds/qmp/* (written for this crate from QEMU's QMP transcripts)
"""
import glob
import hashlib
import os
import re
import struct
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEER = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(ROOT), "shared", "peer-data")
OUT = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "corpus")

counts = {}


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    name = hashlib.sha1(data).hexdigest()
    p = os.path.join(d, name)
    if not os.path.exists(p):
        with open(p, "wb") as f:
            f.write(data)
        counts[target] = counts.get(target, 0) + 1


def cpuset_seed(nbits, text):
    put("cpuset", struct.pack("<H", min(nbits, 0xFFFF)) + text.encode())


if not os.path.isdir(PEER):
    sys.exit(f"peer data not found at {PEER}: pass its path as the first argument")

# profile
for p in sorted(glob.glob(os.path.join(ROOT, "profiles", "*.yaml"))):
    put("profile", open(p, "rb").read())
doc = open(os.path.join(ROOT, "docs", "profile.md")).read()
for block in re.findall(r"```ya?ml\n(.*?)```", doc, re.S):
    put("profile", block)

# vmconfig
for dirpath, _, files in os.walk(os.path.join(PEER, "qemu-server")):
    for f in files:
        if f.endswith((".cmd", ".md", ".adoc", ".pl")):
            continue
        put("vmconfig", open(os.path.join(dirpath, f), "rb").read())

# cpuset: the kernel's vectors
for line in open(os.path.join(PEER, "cpulist-vectors.md")):
    cells = [c.strip() for c in line.split("|")]
    if len(cells) < 5 or not cells[1].isdigit():
        continue
    m = re.fullmatch(r"`(.*)`", cells[2])
    if not m or not cells[3].isdigit():
        continue
    cpuset_seed(int(cells[3]), m.group(1).replace("\\n", "\n"))

CPU_FILE = re.compile(
    r"/(cpulist|cpumap|online|possible|present|offline|isolated|nohz_full|kernel_max|"
    r"[a-z_]*_list|[a-z_]*siblings|shared_cpu_map|cpus|cpuset\.cpus[a-z.]*|"
    r"smp_affinity|smp_affinity_list|default_smp_affinity|effective_affinity(_list)?)$"
)
PID_STAT = re.compile(r"/proc/\d+(/task/\d+)?/stat$")
archives = glob.glob(os.path.join(PEER, "hwloc", "**", "*.tar.*"), recursive=True)
archives += glob.glob(os.path.join(PEER, "util-linux-lscpu", "*.tar.*"))
for a in sorted(archives):
    try:
        with tarfile.open(a) as t:
            for m in t:
                if not m.isfile() or m.size > 65536:
                    continue
                if CPU_FILE.search(m.name):
                    text = t.extractfile(m).read().decode(errors="replace")
                    cpuset_seed(8192, text)
                elif PID_STAT.search(m.name):
                    put("procstat", t.extractfile(m).read())
    except (tarfile.TarError, OSError) as e:
        print(f"skipping {a}: {e}", file=sys.stderr)

# procstat: this machine's own, real kernel output
for p in glob.glob("/proc/[0-9]*/stat") + glob.glob("/proc/[0-9]*/task/[0-9]*/stat"):
    try:
        put("procstat", open(p, "rb").read())
    except OSError:
        pass

for target in ("ledger", "qmp"):
    for p in sorted(glob.glob(os.path.join(HERE, "seeds", target, "*"))):
        put(target, open(p, "rb").read())

for target in ("profile", "vmconfig", "cpuset", "procstat", "ledger", "qmp"):
    n = len(os.listdir(os.path.join(OUT, target))) if os.path.isdir(os.path.join(OUT, target)) else 0
    print(f"{target}: {n} seeds in {os.path.join(OUT, target)}")
