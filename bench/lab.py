#!/usr/bin/env python3
"""Shaped swarm lab: N hosts in network namespaces pull one cold image at once.

Builds a small datacenter in a box with network namespaces only (the root
namespace's interfaces and routes are never touched; addresses come from
198.18.0.0/15):

  shoal-lab-sw    a namespace holding one bridge, the switch
  shoal-lab-o     the origin: a real docker-registry, image pushed by skopeo
  shoal-lab-t     the tracker (shoal-tracker), its link unshaped
  shoal-lab-nK    node K: shoald (or a direct puller), K = 1..N

Every host's link is shaped in both directions with HTB (rate = ceil) and a
bfifo leaf: its upload on its own veth end, its download on the switch's end.
All nodes start pulling every blob of the image at the same instant T0; a node
is done when every blob arrived and its SHA-256 matched. Origin egress is read
from the origin's interface counters, so nothing is hidden.

Runs, in one invocation and on the same lab, Shoal and the baselines: direct
pulls (3 parallel GETs per node, like docker) and a tuned BitTorrent swarm
(Debian's python3-libtorrent peers and opentracker, the origin host the only
seed, 256 KiB pieces, TCP only, no choking, no DHT). Prints a table and one
JSON line per run with t_all, per-node times, origin egress (and the origin's
TCP retransmits), when the origin was done, CPU use and the Kumar–Ross bound
max(F/u_s, F/d_min, N·F/(u_s + Σu_i)).

usage: lab.py --nodes N --rate RATE [--origin-rate RATE] [--layers L]
              [--layer-mib S] [--runs R] [--targets shoal,bittorrent,direct]
              [--queue-ms MS]
              [--chunk-size SIZE] [--shoald-arg ARG]... [--tracker-arg ARG]...
              [--out FILE] [--bin DIR]
Run as root (bench/swarm.sh does the setup and calls this).
"""
import argparse
import fcntl
import hashlib
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

PREFIX = "shoal-lab"
NET = "198.18"
ORIGIN_IP = f"{NET}.0.1"
TRACKER_IP = f"{NET}.0.2"
REGISTRY_PORT = 5000
TRACKER_PORT = 4902
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def node_ip(k):
    return f"{NET}.{1 + k // 250}.{k % 250 + 1}"


def rate_bits(s):
    """'100mbit' -> bits per second."""
    t = s.strip().lower()
    for suf, mult in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1)):
        if t.endswith(suf):
            return int(float(t[: -len(suf)]) * mult)
    raise SystemExit(f"lab.py: {s!r} is not a rate like 100mbit or 1gbit")


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, **kw)


def ns_exec(ns, *args):
    return ["ip", "netns", "exec", ns, *args]


class Lab:
    """The namespaces, links and shaping; torn down by `close`."""

    def __init__(self, nodes, rate, origin_rate):
        self.nodes = nodes
        self.rate = rate
        self.origin_rate = origin_rate
        self.namespaces = []
        self.procs = []

    def add_host(self, name, ip, rate_bps):
        ns = f"{PREFIX}-{name}"
        sw = f"{PREFIX}-sw"
        host_if, sw_if = f"sl{name}a", f"sl{name}b"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        sh("ip", "link", "add", host_if, "netns", ns, "type", "veth", "peer", "name", sw_if, "netns", sw)
        sh(*ns_exec(ns, "ip", "link", "set", host_if, "name", "eth0"))
        sh(*ns_exec(ns, "ip", "addr", "add", f"{ip}/15", "dev", "eth0"))
        sh(*ns_exec(ns, "ip", "link", "set", "eth0", "up"))
        sh(*ns_exec(sw, "ip", "link", "set", sw_if, "master", "br0"))
        sh(*ns_exec(sw, "ip", "link", "set", sw_if, "up"))
        if rate_bps:
            # Upload: the host's own end; download: the switch's end toward it.
            shape(ns, "eth0", rate_bps)
            shape(sw, sw_if, rate_bps)
        return ns

    def build(self):
        sw = f"{PREFIX}-sw"
        sh("ip", "netns", "add", sw)
        self.namespaces.append(sw)
        sh(*ns_exec(sw, "ip", "link", "add", "br0", "type", "bridge"))
        sh(*ns_exec(sw, "ip", "link", "set", "br0", "up"))
        self.origin = self.add_host("o", ORIGIN_IP, self.origin_rate)
        self.tracker = self.add_host("t", TRACKER_IP, 0)
        self.hosts = [self.add_host(f"n{k}", node_ip(k), self.rate) for k in range(1, self.nodes + 1)]
        self.pin_neighbours()

    def pin_neighbours(self):
        """Permanent ARP entries between every pair of hosts, as a running
        cluster's warm caches are: cold ones resolve at T0 through shaped
        queues that are full at once, and an origin's ARP reply lost in
        its full uplink queue left a member with `No route to host` for
        12 s (its pull failed)."""
        hosts = [(self.origin, ORIGIN_IP), (self.tracker, TRACKER_IP)]
        hosts += [(ns, node_ip(k)) for k, ns in enumerate(self.hosts, 1)]
        macs = {}
        for ns, ip in hosts:
            out = subprocess.run(ns_exec(ns, "cat", "/sys/class/net/eth0/address"),
                                 capture_output=True, text=True, check=True)
            macs[ip] = out.stdout.strip()
        for ns, own in hosts:
            batch = "".join(f"neigh replace {ip} lladdr {mac} dev eth0 nud permanent\n"
                            for ip, mac in macs.items() if ip != own)
            subprocess.run(ns_exec(ns, "ip", "-batch", "-"), input=batch, text=True, check=True)

    def drops(self):
        """Packets dropped by full queues so far, by where: the origin's
        upload, the nodes' uploads, the nodes' downloads."""
        sw = f"{PREFIX}-sw"
        return {
            "origin_up": qdisc_drops(self.origin, "eth0") if self.origin_rate else 0,
            "nodes_up": sum(qdisc_drops(ns, "eth0") for ns in self.hosts) if self.rate else 0,
            "nodes_down": sum(qdisc_drops(sw, f"sln{k}b") for k in range(1, self.nodes + 1)) if self.rate else 0,
        }

    def spawn(self, ns, args, log):
        f = open(log, "ab")
        p = subprocess.Popen(ns_exec(ns, *args), stdout=f, stderr=f, start_new_session=True)
        self.procs.append(p)
        return p

    def stop(self, procs):
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs = [p for p in self.procs if p not in procs]

    def close(self):
        self.stop(list(self.procs))
        for ns in reversed(self.namespaces):
            sh("ip", "netns", "del", ns, check=False)
        self.namespaces = []


# How long each shaped link's queue is at its rate (--queue-ms).
QUEUE_MS = 50


def shape(ns, dev, bps):
    """HTB rate = ceil with a bfifo leaf of QUEUE_MS at that rate (64 KiB
    at least)."""
    limit = max(64 * 1024, bps // 8 * QUEUE_MS // 1000)
    # r2q so the class quantum (rate / r2q) stays within HTB's bounds.
    r2q = str(max(10, bps // 8 // 60000))
    sh(*ns_exec(ns, "tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "10", "r2q", r2q))
    sh(*ns_exec(ns, "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
                "rate", f"{bps}bit", "ceil", f"{bps}bit", "burst", "64k", "cburst", "64k"))
    sh(*ns_exec(ns, "tc", "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:", "bfifo", "limit", str(limit)))


def tx_bytes(ns):
    out = subprocess.run(ns_exec(ns, "cat", "/sys/class/net/eth0/statistics/tx_bytes"),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def tcp_retransmits(ns):
    """Segments the host's TCP retransmitted (they count in tx_bytes too)."""
    out = subprocess.run(ns_exec(ns, "cat", "/proc/net/snmp"), capture_output=True, text=True, check=True)
    rows = [l.split() for l in out.stdout.splitlines() if l.startswith("Tcp:")]
    return int(rows[1][rows[0].index("RetransSegs")])


TCP_EXT = ("TCPTimeouts", "TCPLossProbes", "TCPFastRetrans", "TCPSlowStartRetrans",
           "TCPSpuriousRTOs", "TCPDSACKRecv", "TCPLostRetransmit")


# Receiver-side reasons to drop a segment that arrived.
TCP_EXT_RX = ("TCPRcvQDrop", "PruneCalled", "RcvPruned", "OfoPruned", "TCPOFODrop",
              "TCPBacklogDrop", "TCPZeroWindowDrop", "TCPDSACKOldSent", "TCPDSACKOfoSent")


def tcp_ext(ns, keys=TCP_EXT):
    """The host's TcpExt counters `keys` (by default: why TCP retransmitted)."""
    out = subprocess.run(ns_exec(ns, "cat", "/proc/net/netstat"), capture_output=True, text=True, check=True)
    rows = [l.split() for l in out.stdout.splitlines() if l.startswith("TcpExt:")]
    have = dict(zip(rows[0][1:], rows[1][1:]))
    return {k: int(have.get(k, 0)) for k in keys}


def nodes_tcp_rx(lab):
    """TCP receive-side drop counters summed over the nodes."""
    total = dict.fromkeys(TCP_EXT_RX, 0)
    for ns in lab.hosts:
        for k, v in tcp_ext(ns, TCP_EXT_RX).items():
            total[k] += v
    return total


def qdisc_drops(ns, dev):
    """Packets the bfifo leaves of `dev` dropped (full queue) so far."""
    out = subprocess.run(ns_exec(ns, "tc", "-s", "qdisc", "show", "dev", dev),
                         capture_output=True, text=True, check=True)
    drops, leaf = 0, False
    for line in out.stdout.splitlines():
        if line.startswith("qdisc "):
            leaf = line.split()[1] == "bfifo"
        elif leaf and "dropped" in line:
            drops += int(line.split("dropped")[1].split(",")[0].strip())
    return drops


def rss_mb(pid, field):
    """`VmRSS` or `VmHWM` (peak) of a process in MiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_ticks():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v), idle


def wait_http(url, what, timeout=30, ns=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        cmd = ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", url]
        if ns:
            cmd = ns_exec(ns, *cmd)
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"lab.py: {what} did not answer {url} within {timeout} s")


PULLER = r'''
import hashlib, json, sys, threading, time, urllib.error, urllib.request
base, start, parallel = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
blobs = json.loads(sys.argv[4])
manifest = sys.argv[5] if len(sys.argv) > 5 else ""
todo = list(blobs)
lock = threading.Lock()
errors = []
def work():
    while True:
        with lock:
            if not todo:
                return
            d, size = todo.pop(0)
        h, n = hashlib.sha256(), 0
        try:
            with urllib.request.urlopen(f"{base}/{d}", timeout=600) as r:
                while True:
                    b = r.read(1 << 20)
                    if not b:
                        break
                    h.update(b)
                    n += len(b)
        except urllib.error.HTTPError as e:
            body = e.read(400).decode(errors="replace")
            errors.append(f"{d}: {e} after {time.time() - start:.1f} s: {body}")
            continue
        except Exception as e:
            errors.append(f"{d}: {e} after {time.time() - start:.1f} s")
            continue
        if "sha256:" + h.hexdigest() != d or n != size:
            errors.append(f"{d}: got {n} bytes hashing to sha256:{h.hexdigest()}")
while time.time() < start:
    time.sleep(min(0.01, max(0, start - time.time())))
if manifest:
    # As a runtime does: the manifest by tag first, then what it names.
    req = urllib.request.Request(manifest, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json, "
                  "application/vnd.docker.distribution.manifest.v2+json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            r.read()
    except Exception as e:
        errors.append(f"manifest: {e} after {time.time() - start:.1f} s")
threads = [threading.Thread(target=work) for _ in range(parallel)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"done": time.time(), "errors": errors}))
'''


# A libtorrent peer (Debian's python3-libtorrent, under /usr/bin/python3): TCP
# only, no DHT/LSD/UPnP, no choking (every interested peer unchoked). A seed
# serves until killed; a leecher prints its finish time once every file is
# here and its SHA-256 matches, then keeps seeding until killed.
BT_WORKER = r'''
import hashlib, json, os, sys, time
import libtorrent as lt
role, torrent, save, ip, start = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
digests = json.loads(sys.argv[6])
ses = lt.session({
    "listen_interfaces": f"{ip}:6881", "outgoing_interfaces": ip,
    "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
    "enable_outgoing_utp": False, "enable_incoming_utp": False,
    "unchoke_slots_limit": -1, "connections_limit": 500, "active_downloads": -1, "active_seeds": -1,
    "announce_ip": ip, "allow_multiple_connections_per_ip": True,
    "alert_mask": 0,
})
info = lt.torrent_info(torrent)
if role == "leech":
    while time.time() < start:
        time.sleep(min(0.01, max(0, start - time.time())))
params = lt.add_torrent_params()
params.ti = info
params.save_path = save
h = ses.add_torrent(params)
if role == "seed":
    while True:
        time.sleep(1)
while not h.status().is_seeding:
    time.sleep(0.02)
errors = []
for f, d in digests.items():
    hs = hashlib.sha256()
    with open(os.path.join(save, f), "rb") as fh:
        while True:
            b = fh.read(1 << 20)
            if not b:
                break
            hs.update(b)
    if "sha256:" + hs.hexdigest() != d:
        errors.append(f"{f}: SHA-256 does not match")
print(json.dumps({"done": time.time(), "errors": errors}), flush=True)
while True:
    time.sleep(1)
'''


def make_torrent(lab, blobs, work):
    """The image's blobs as one torrent (256 KiB pieces) seeded by the origin."""
    seed = os.path.join(work, "bt-seed")
    files = os.path.join(seed, "image")
    os.makedirs(files, exist_ok=True)
    for d, _ in blobs:
        sh(*ns_exec(lab.origin, "curl", "-fsS", "-o", os.path.join(files, d.split(":")[1]),
                    f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/bench/app/blobs/{d}"))
    torrent = os.path.join(work, "image.torrent")
    sh("/usr/bin/python3", "-c",
       "import libtorrent as lt, sys\n"
       "fs = lt.file_storage(); lt.add_files(fs, sys.argv[1])\n"
       "t = lt.create_torrent(fs, 256 * 1024, flags=lt.create_torrent.v1_only)\n"
       "t.add_tracker(sys.argv[3]); lt.set_piece_hashes(t, sys.argv[2])\n"
       "open(sys.argv[4], 'wb').write(lt.bencode(t.generate()))\n"
       "open(sys.argv[5], 'w').write(str(lt.torrent_info(sys.argv[4]).info_hashes().v1) + '\\n')",
       files, seed, f"http://{TRACKER_IP}:6969/announce", torrent, torrent + ".allow")
    # opentracker drops to an unprivileged user before it reads the list.
    os.chmod(work, 0o755)
    os.chmod(torrent + ".allow", 0o644)
    return seed, torrent


def read_line(p, deadline):
    """The first line `p` prints before `deadline`, or None."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    while time.time() < deadline:
        if sel.select(timeout=max(0.0, min(1.0, deadline - time.time()))):
            line = p.stdout.readline()
            return line.strip() if line else (p.stderr.read()[-500:] or "(no output)")
    return None


def kumar_ross(F, us, d, u, N):
    return max(F / us, F / d, N * F / (us + N * u))


def read_samples(sampler, t0, base):
    """A sampler's `TIME BYTES` lines as (seconds from T0, bytes − base)."""
    samples = []
    for line in sampler.communicate()[0].splitlines():
        try:
            at, sent = line.split()
            samples.append((float(at) - t0, int(sent) - base))
        except ValueError:
            pass
    return samples


def mbps_by_second(samples):
    """Mbit/s in each whole second from T0, from (seconds, bytes so far)."""
    timeline, last = [], 0
    for sec in range(1, int(max((at for at, _ in samples), default=0)) + 1):
        upto = max((sent for at, sent in samples if at <= sec), default=0)
        timeline.append(round((upto - last) * 8 / 1e6, 1))
        last = upto
    return timeline


def node_metrics(ns):
    """A shoald's peer and origin bytes received so far, from its ops port
    (`None` if it did not answer)."""
    got = subprocess.run(ns_exec(ns, "curl", "-sf", "--max-time", "5", "http://127.0.0.1:4903/metrics"),
                         capture_output=True, text=True)
    if got.returncode != 0:
        return None
    out = {"peer": 0, "origin": 0}
    for line in got.stdout.splitlines():
        if line.startswith("shoal_peer_bytes_received_total "):
            out["peer"] = int(float(line.split()[1]))
        elif line.startswith('shoal_origin_bytes_total{kind="blob"} '):
            out["origin"] = int(float(line.split()[1]))
    return out


def received_per_node(r, image_bytes):
    """Bytes each member received (peers and origin), × image: min, median, max."""
    got = sorted((m["peer"] + m["origin"]) / image_bytes for m in r["received"] if m)
    if not got:
        return None
    return {"min": round(got[0], 3), "median": round(got[len(got) // 2], 3), "max": round(got[-1], 3)}


def origin_payload(r, image_bytes):
    """Blob bytes all members received from the origin, × image (`None`
    unless every member answered)."""
    got = r["received"]
    if not got or not all(got):
        return None
    return round(sum(m["origin"] for m in got) / image_bytes, 4)


def nodes_up_use(r, nodes, rate_bps):
    """The nodes' uploads until the last one was done, as a share of what
    their uplinks could carry in that time."""
    if not r["times"] or not nodes or not rate_bps:
        return None
    t_last = max(r["times"])
    sent = sum(r["nodes_up"][:int(t_last) + 1]) * 1e6  # bits
    return round(sent / (nodes * rate_bps * t_last), 3) if t_last > 0 else None


def log_trouble(path, keep=8):
    """The last `keep` WARN and ERROR lines of a shoald log, colours removed."""
    lines = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                line = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
                if " WARN " in line or " ERROR " in line:
                    lines = (lines + [line[:400]])[-keep:]
    except OSError as e:
        lines.append(f"(log unreadable: {e})")
    return lines


def run_once(lab, target, blobs, image_bytes, work, args, run_no):
    """One pull of the whole image by every node at once."""
    started = []
    if target == "shoal":
        ca = os.path.join(work, f"ca-{run_no}")
        sh(os.path.join(args.bin, "shoald"), "cluster-init", ca, stdout=subprocess.DEVNULL)
        tracker = lab.spawn(lab.tracker, [os.path.join(args.bin, "shoal-tracker"),
                                          "--listen", f"{TRACKER_IP}:{TRACKER_PORT}",
                                          "--cluster-dir", ca, "--name", TRACKER_IP,
                                          "--ops-listen", f"{TRACKER_IP}:4903",
                                          *args.tracker_arg],
                            os.path.join(work, f"tracker-{run_no}.log"))
        started.append(tracker)
        wait_http(f"http://{TRACKER_IP}:4903/healthz", "shoal-tracker", ns=lab.tracker)
        for k, ns in enumerate(lab.hosts, 1):
            data = os.path.join(work, f"data-{run_no}-{k}")
            cmd = [os.path.join(args.bin, "shoald"), "run",
                   "--data-dir", data,
                   "--registry-listen", "127.0.0.1:4900",
                   "--ops-listen", "127.0.0.1:4903",
                   "--insecure-upstream", f"{ORIGIN_IP}:{REGISTRY_PORT}",
                   "--default-upstream", f"{ORIGIN_IP}:{REGISTRY_PORT}",
                   "--cluster-dir", ca, "--node-id", f"node-{k}",
                   "--peer-listen", f"{node_ip(k)}:4901",
                   "--tracker", f"https://{TRACKER_IP}:{TRACKER_PORT}"]
            if args.chunk_size:
                cmd += ["--chunk-size", args.chunk_size]
            cmd += args.shoald_arg
            started.append(lab.spawn(ns, cmd, os.path.join(work, f"shoald-{run_no}-{k}.log")))
        for ns in lab.hosts:
            wait_http("http://127.0.0.1:4903/healthz", "shoald", ns=ns)
        time.sleep(1.0)  # a first heartbeat, so every member is known
        base = f"http://127.0.0.1:4900/v2/bench/app/blobs"
        manifest_url = "http://127.0.0.1:4900/v2/bench/app/manifests/latest"
        parallel = len(blobs)
    elif target == "bittorrent":
        if not hasattr(lab, "torrent"):
            lab.seed_dir, lab.torrent = make_torrent(lab, blobs, work)
        # Debian's opentracker serves only whitelisted torrents (-w).
        started.append(lab.spawn(lab.tracker, ["opentracker", "-i", TRACKER_IP, "-p", "6969", "-P", "6969",
                                               "-w", lab.torrent + ".allow"],
                                 os.path.join(work, f"opentracker-{run_no}.log")))
        digests = json.dumps({f"image/{d.split(':')[1]}": d for d, _ in blobs})
        started.append(lab.spawn(lab.origin, ["/usr/bin/python3", "-c", BT_WORKER, "seed", lab.torrent,
                                              lab.seed_dir, ORIGIN_IP, "0", digests],
                                 os.path.join(work, f"bt-seed-{run_no}.log")))
        time.sleep(1.0)
    else:
        base = f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/bench/app/blobs"
        manifest_url = f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/bench/app/manifests/latest"
        parallel = 3

    # `ip netns exec` execs the daemon: these are the shoald processes.
    daemons = [p.pid for p in started[1:]] if target == "shoal" else []
    rss_idle = [rss_mb(pid, "VmRSS") for pid in daemons]
    egress0 = tx_bytes(lab.origin)
    retrans0 = tcp_retransmits(lab.origin)
    drops0 = lab.drops()
    ext0 = tcp_ext(lab.origin)
    rx0 = nodes_tcp_rx(lab)
    cpu0 = cpu_ticks()
    # The origin's sent bytes over time, to tell when its part was done.
    sampler = subprocess.Popen(
        ns_exec(lab.origin, "sh", "-c",
                "while :; do echo $(date +%s.%N) $(cat /sys/class/net/eth0/statistics/tx_bytes); sleep 0.05; done"),
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    # What the nodes sent, all together (their uplinks, read on the
    # switch's ends: a node's upload is its switch port's receive).
    up_sampler = subprocess.Popen(
        ns_exec(f"{PREFIX}-sw", "sh", "-c",
                "while :; do echo $(date +%s.%N) $(cat /sys/class/net/sln*b/statistics/rx_bytes"
                # %.0f: mawk prints a sum past 2^31 as "3e+09" with print.
                " | awk '{s+=$1} END {printf \"%.0f\\n\", s}'); sleep 0.25; done"),
        stdout=subprocess.PIPE, text=True, start_new_session=True)
    t0 = time.time() + 2.0
    pullers = []
    for k, ns in enumerate(lab.hosts, 1):
        if target == "bittorrent":
            save = os.path.join(work, f"bt-{run_no}-{k}")
            os.makedirs(save, exist_ok=True)
            cmd = ["/usr/bin/python3", "-c", BT_WORKER, "leech", lab.torrent, save, node_ip(k),
                   repr(t0), digests]
        else:
            cmd = [sys.executable, "-c", PULLER, base, repr(t0), str(parallel), json.dumps(blobs),
                   manifest_url if args.manifest_first else ""]
        pullers.append(subprocess.Popen(ns_exec(ns, *cmd), stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True))
    times, errors = [], []
    deadline = time.time() + args.timeout
    for k, p in enumerate(pullers, 1):
        # The first line is the node's result; BitTorrent leechers then keep
        # seeding for the others until every node is done.
        line = read_line(p, deadline)
        if line is None:
            errors.append(f"node {k}: no finish within {args.timeout} s")
            continue
        try:
            r = json.loads(line)
        except ValueError:
            errors.append(f"node {k}: puller failed: {line[-500:]}")
            continue
        errors += [f"node {k}: {e}" for e in r["errors"]]
        times.append(r["done"] - t0)
    for p in pullers:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    cpu1 = cpu_ticks()
    egress = tx_bytes(lab.origin) - egress0
    retrans = tcp_retransmits(lab.origin) - retrans0
    drops = {k: v - drops0[k] for k, v in lab.drops().items()}
    ext = {k: v - ext0[k] for k, v in tcp_ext(lab.origin).items()}
    ext.update({f"nodes_{k}": v - rx0[k] for k, v in nodes_tcp_rx(lab).items()})
    os.killpg(sampler.pid, signal.SIGKILL)
    os.killpg(up_sampler.pid, signal.SIGKILL)
    # The nodes' counters are read from before T0: count from the last
    # reading at or before it.
    up = read_samples(up_sampler, t0, 0)
    up_base = max((sent for at, sent in up if at <= 0), default=up[0][1] if up else 0)
    nodes_up = mbps_by_second([(at, sent - up_base) for at, sent in up])
    samples = read_samples(sampler, t0, egress0)
    origin_done = next((at for at, sent in samples if sent >= 0.99 * egress), None)
    # The origin's send rate, second by second from T0 (Mbit/s).
    timeline = mbps_by_second(samples)
    rss_peak = [rss_mb(pid, "VmHWM") for pid in daemons]
    # What each member received, from its own counters: more than one
    # image means chunks fetched twice (moved requests both answered,
    # endgame duplicates, cancelled streams still sending).
    received = [node_metrics(ns) for ns in lab.hosts] if target == "shoal" else []
    lab.stop(started)
    # Chunks each member stored twice (both answers of a moved request,
    # endgame duplicates), from its "blob complete" log lines.
    tally = {"from_origin": 0, "from_peers": 0, "duplicates": 0}
    if target == "shoal":
        for k in range(1, len(lab.hosts) + 1):
            try:
                with open(os.path.join(work, f"shoald-{run_no}-{k}.log"), errors="replace") as f:
                    for line in f:
                        if "blob complete" in line:
                            line = re.sub(r"\x1b\[[0-9;]*m", "", line)  # text logs carry colours
                            for key in tally:
                                m = re.search(rf"\b{key}=(\d+)", line)
                                tally[key] += int(m.group(1)) if m else 0
            except OSError:
                pass
    # A failed member's own account: its last warnings and errors.
    if target == "shoal":
        for k in sorted({int(m.group(1)) for m in (re.match(r"node (\d+): ", e) for e in errors) if m}):
            errors += [f"node {k} log: {l}" for l in log_trouble(os.path.join(work, f"shoald-{run_no}-{k}.log"))]
    total, idle = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return {
        "times": times,
        "errors": errors,
        "egress": egress,
        "origin_done": origin_done,
        "retrans": retrans,
        "drops": drops,
        "timeline": timeline,
        "nodes_up": nodes_up,
        "tcp_ext": ext,
        "rss_idle": max((r for r in rss_idle if r is not None), default=None),
        "rss_peak": max((r for r in rss_peak if r is not None), default=None),
        "received": received,
        "chunks": tally if target == "shoal" else None,
        "cpu_busy": (total - idle) / total if total else 0.0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--origin-rate")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--layer-mib", type=int, default=16)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--targets", default="shoal,bittorrent,direct")
    ap.add_argument("--chunk-size")
    ap.add_argument("--tracker-arg", action="append", default=[],
                    help="one more argument for shoal-tracker (repeatable), e.g. --tracker-arg=--origin-lease-bytes=2MiB")
    ap.add_argument("--shoald-arg", action="append", default=[],
                    help="one more argument for every shoald (repeatable), e.g. --shoald-arg=--peer-upload-rate=22mbit")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--queue-ms", type=int, default=50,
                    help="each shaped link's queue, in milliseconds at its rate")
    ap.add_argument("--manifest-first", action="store_true",
                    help="Shoal and direct pullers GET the manifest by tag before the blobs, as runtimes do")
    ap.add_argument("--out")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release"))
    args = ap.parse_args()
    global QUEUE_MS
    if not 1 <= args.queue_ms <= 10_000:
        raise SystemExit("lab.py: --queue-ms must be between 1 and 10000")
    QUEUE_MS = args.queue_ms
    if os.geteuid() != 0:
        raise SystemExit("lab.py: run as root (network namespaces); bench/swarm.sh does")
    if not 1 <= args.nodes <= 200:
        raise SystemExit("lab.py: --nodes must be between 1 and 200")
    targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t not in ("shoal", "direct", "bittorrent"):
            raise SystemExit(f"lab.py: unknown target {t!r} (shoal, direct, bittorrent)")
    rate = rate_bits(args.rate)
    origin_rate = rate_bits(args.origin_rate or args.rate)

    lock = open("/run/shoal-lab.lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("lab.py: another lab run holds /run/shoal-lab.lock")
    # Leftovers of a run that was killed hard.
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(PREFIX + "-"):
            sh("ip", "netns", "del", name, check=False)

    work = tempfile.mkdtemp(prefix="shoal-lab-")
    lab = Lab(args.nodes, rate, origin_rate)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    results = []
    try:
        lab.build()
        # The origin: docker-registry, and the image pushed into it with skopeo.
        reg_dir = os.path.join(work, "registry")
        with open(os.path.join(work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {reg_dir}\n"
                    f"http:\n  addr: {ORIGIN_IP}:{REGISTRY_PORT}\nlog:\n  level: error\n")
        lab.spawn(lab.origin, ["docker-registry", "serve", os.path.join(work, "registry.yml")],
                  os.path.join(work, "registry.log"))
        wait_http(f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/", "docker-registry", ns=lab.origin)
        image = os.path.join(work, "image")
        sh(sys.executable, os.path.join(ROOT, "scripts", "make-image.py"), image, "latest",
           str(args.layers), str(args.layer_mib), stdout=subprocess.DEVNULL)
        sh(*ns_exec(lab.origin, "skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci:{image}:latest", f"docker://{ORIGIN_IP}:{REGISTRY_PORT}/bench/app:latest"))
        # skopeo may recompress layers on the way: the registry's manifest
        # names the blobs the pulls will ask for.
        got = subprocess.run(ns_exec(lab.origin, "curl", "-fsS", "-H",
                                     "Accept: application/vnd.oci.image.manifest.v1+json",
                                     f"http://{ORIGIN_IP}:{REGISTRY_PORT}/v2/bench/app/manifests/latest"),
                             capture_output=True, text=True, check=True)
        manifest = json.loads(got.stdout)
        blobs = [(manifest["config"]["digest"], manifest["config"]["size"])]
        blobs += [(l["digest"], l["size"]) for l in manifest["layers"]]
        F = sum(s for _, s in blobs)
        N = args.nodes
        bound = kumar_ross(F * 8, origin_rate, rate, rate, N)

        for run in range(args.runs):
            for target in targets:
                r = run_once(lab, target, blobs, F, work, args, f"{run}-{target}")
                times = sorted(r["times"])
                t_all = times[-1] if len(times) == N and not r["errors"] else None
                median = times[len(times) // 2] if times else None
                line = {
                    "bench": "lab", "target": target, "run": run,
                    "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
                    "nodes": N, "rate_bps": rate, "origin_rate_bps": origin_rate,
                    "queue_ms": QUEUE_MS,
                    "layers": args.layers, "layer_mib": args.layer_mib, "image_bytes": F,
                    "chunk_size": args.chunk_size if target == "shoal" else None,
                    "shoald_args": args.shoald_arg if target == "shoal" else None,
                    "manifest_first": args.manifest_first and target != "bittorrent",
                    "tracker_args": args.tracker_arg if target == "shoal" else None,
                    "t_all_s": t_all, "median_s": median,
                    "node_times_s": [round(t, 3) for t in r["times"]],
                    "bound_s": bound, "ratio_to_bound": (t_all / bound) if t_all else None,
                    "slowest_over_median": (t_all / median) if t_all and median else None,
                    "origin_egress_bytes": r["egress"], "egress_ratio": r["egress"] / F,
                    "origin_done_s": round(r["origin_done"], 3) if r["origin_done"] is not None else None,
                    "origin_tcp_retransmits": r["retrans"],
                    "queue_drops": r["drops"],
                    "origin_mbps_by_second": r["timeline"],
                    # All nodes' uploads together, Mbit/s second by second
                    # from T0, and as a share of their capacity until the
                    # last node was done.
                    "nodes_up_mbps_by_second": r["nodes_up"],
                    "nodes_up_use": nodes_up_use(r, args.nodes, rate),
                    "received_per_node_x_image": received_per_node(r, F),
                    # What the members got from the origin, by their own
                    # counters: the origin's payload, as the simulator
                    # counts egress (no headers, no TCP retransmissions).
                    "origin_payload_ratio": origin_payload(r, F),
                    "chunks_stored": r["chunks"],
                    "origin_tcp_ext": r["tcp_ext"],
                    "shoald_rss_idle_mib_max": r["rss_idle"] and round(r["rss_idle"], 1),
                    "shoald_rss_peak_mib_max": r["rss_peak"] and round(r["rss_peak"], 1),
                    "cpu_busy": round(r["cpu_busy"], 3), "errors": r["errors"][:20],
                }
                results.append(line)
                print(json.dumps(line), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(line) + "\n")
    except KeyboardInterrupt:
        print("lab.py: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        lab.close()
        if os.environ.get("SHOAL_LAB_KEEP"):
            print(f"lab.py: logs kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"| {args.nodes} nodes at {args.rate} (origin {args.origin_rate or args.rate}), "
          f"{args.layers} x {args.layer_mib} MiB | t_all s | × bound | slowest / median | origin egress × image | origin done s | uplinks used | CPU busy |")
    print("|---|---|---|---|---|---|---|---|")
    for l in results:
        fmt = lambda v, p=2: "–" if v is None else f"{v:.{p}f}"
        print(f"| {l['target']} (run {l['run']}) | {fmt(l['t_all_s'])} | {fmt(l['ratio_to_bound'])} | "
              f"{fmt(l['slowest_over_median'])} | {fmt(l['egress_ratio'], 3)} | {fmt(l['origin_done_s'])} | "
              f"{fmt(l['nodes_up_use'])} | {l['cpu_busy']:.2f} |")
        if l["errors"]:
            print(f"  errors: {l['errors'][:3]}")
    print(f"bound (Kumar–Ross) {bound:.2f} s for F = {F} bytes")
    return 0 if all(not l["errors"] for l in results) else 1


if __name__ == "__main__":
    sys.exit(main())
