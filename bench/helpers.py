#!/usr/bin/env python3
"""Small stdlib-only helpers for bench/single-node.sh.

Subcommands:
  free-ports N                    print N distinct free 127.0.0.1 TCP ports
  manifest OUTDIR LAYER_DIGEST LAYER_SIZE
                                  write config.json and manifest.json for a
                                  one-layer OCI image; print the config digest
  iperf-gbps FILE                 receiver throughput of an `iperf3 -J` run, GB/s
  wrk FILE                        parse wrk --latency output into JSON
                                  {rps, p50_ms, p99_ms, requests, errors}
  metric FILE NAME [LABELS]       value of one sample in a Prometheus text dump
  median V...                     median of the numbers
  record OUT KEY=VALUE...         append one JSON line (numbers stay numbers,
                                  VALUE may be a JSON list like [1,2])
  throttle-proxy LISTEN_PORT TARGET_PORT RATE LIFETIME
                                  TCP proxy on 127.0.0.1 pacing responses to
                                  RATE bytes/s per connection (a WAN-like
                                  origin); exits after LIFETIME seconds
  aggregate-wrk RUNS OUT RUN_ID   medians per (test, target) of wrk runs -> OUT
  table OUT [RUN_ID]              print the markdown summary of one run of a
                                  results file (default: its last run)
"""

import hashlib
import json
import os
import re
import socket
import statistics
import sys
import threading
import time


def free_ports(n):
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    print(" ".join(str(p) for p in ports))


def manifest(outdir, layer_digest, layer_size):
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    }
    cbytes = json.dumps(config, separators=(",", ":")).encode()
    cdigest = "sha256:" + hashlib.sha256(cbytes).hexdigest()
    with open(os.path.join(outdir, "config.json"), "wb") as f:
        f.write(cbytes)
    m = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": cdigest,
            "size": len(cbytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": int(layer_size),
            }
        ],
    }
    with open(os.path.join(outdir, "manifest.json"), "wb") as f:
        f.write(json.dumps(m, separators=(",", ":")).encode())
    print(cdigest)


def iperf_gbps(path):
    with open(path) as f:
        d = json.load(f)
    if "error" in d:
        sys.exit("iperf3: " + d["error"])
    bps = d["end"]["sum_received"]["bits_per_second"]
    print(f"{bps / 8 / 1e9:.4f}")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(tok):
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", tok)
    if not m:
        raise ValueError(f"unparsable wrk latency {tok!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(path):
    text = open(path).read()
    out = {"errors": 0}
    m = re.search(r"Requests/sec:\s+([0-9.]+)", text)
    if not m:
        sys.exit("wrk output has no Requests/sec line:\n" + text)
    out["rps"] = float(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        out[key] = round(_ms(m.group(1)), 4) if m else None
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["errors"] += sum(int(x) for x in m.groups())
    print(json.dumps(out))


def metric(path, name, labels=""):
    want = name + ("{" + labels + "}" if labels else "")
    for line in open(path):
        if line.startswith(want + " "):
            print(line.split()[1])
            return
    print("0")


def median(vals):
    print(f"{statistics.median(float(v) for v in vals):.6g}")


def record(out, pairs):
    d = {}
    for p in pairs:
        k, _, v = p.partition("=")
        try:
            d[k] = json.loads(v)
        except ValueError:
            d[k] = v
    with open(out, "a") as f:
        f.write(json.dumps(d) + "\n")


def aggregate_wrk(runs_file, out, run_id):
    """One record per (test, target): medians over its wrk runs, runs kept."""
    groups = {}
    for line in open(runs_file):
        if line.strip():
            r = json.loads(line)
            groups.setdefault((r["test"], r["target"]), []).append(r)
    with open(out, "a") as f:
        for (test, target), rs in groups.items():
            d = {"run_id": run_id, "test": test, "target": target, "n": len(rs)}
            for k in ("connections", "threads", "seconds"):
                d[k] = rs[0][k]
            for k in ("rps", "p50_ms", "p99_ms", "server_cpu_cores"):
                vals = [r[k] for r in rs if r.get(k) is not None]
                d[k] = round(statistics.median(vals), 4) if vals else None
                d[k + "_runs"] = [r.get(k) for r in rs]
            d["errors"] = sum(r.get("errors") or 0 for r in rs)
            f.write(json.dumps(d) + "\n")


def throttle_proxy(listen_port, target_port, rate, lifetime):
    """A TCP proxy on 127.0.0.1:listen_port to 127.0.0.1:target_port whose
    responses (target -> client) are paced to `rate` bytes/s per connection:
    an origin behind a WAN-like link. Exits by itself after `lifetime` s."""
    listen_port, target_port, rate, lifetime = int(listen_port), int(target_port), float(rate), float(lifetime)
    chunk = 256 * 1024

    def pipe(src, dst, paced):
        start, sent = time.monotonic(), 0
        try:
            while True:
                data = src.recv(chunk)
                if not data:
                    break
                dst.sendall(data)
                if paced:
                    sent += len(data)
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            for s_ in (src, dst):
                try:
                    s_.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def handle(client):
        try:
            upstream = socket.create_connection(("127.0.0.1", target_port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for s_ in (client, upstream):
            s_.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = threading.Thread(target=pipe, args=(client, upstream, False), daemon=True)
        t.start()
        pipe(upstream, client, True)
        t.join(timeout=5)
        client.close()
        upstream.close()

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(64)
    srv.settimeout(1.0)
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline:
        try:
            c, _ = srv.accept()
        except socket.timeout:
            continue
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def _fmt(v, nd=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(out, run_id=None):
    rows = [json.loads(l) for l in open(out) if l.strip()]
    if run_id is None and rows:
        run_id = rows[-1].get("run_id")
    rows = [r for r in rows if r.get("run_id") == run_id]
    by = {}
    for r in rows:
        by[(r["test"], r.get("target"))] = r

    def g(test, target, key):
        r = by.get((test, target))
        return None if r is None else r.get(key)

    def ratio(a, b):
        return None if a in (None, 0) or b in (None, 0) else a / b

    lines = []
    meta = by.get(("meta", None), {})
    lines.append(
        f"Run {meta.get('date', '?')} on {meta.get('host', '?')} "
        f"({meta.get('cpus', '?')} CPUs), blob {meta.get('blob_mib', '?')} MiB, "
        f"shoald {meta.get('shoald_version', '?')}"
    )
    lines.append("")
    errs = sum(r.get("errors") or 0 for r in rows if "errors" in r)
    if errs:
        lines.append(f"**{errs} wrk requests failed (non-2xx or socket errors): see the JSON lines.**")
        lines.append("")
    lines.append("| measurement | shoald | baseline | ratio (shoald/baseline) | goal | met |")
    lines.append("|---|---|---|---|---|---|")

    # 1. Cache-hit blob GET.
    s = g("blob_cache_hit", "shoald", "median_gbps")
    reg = g("blob_cache_hit", "registry", "median_gbps")
    ip = g("blob_cache_hit", "iperf3", "median_gbps")
    r_ip, r_reg = ratio(s, ip), ratio(s, reg)
    lines.append(
        f"| cache-hit blob GET, GB/s (median of {g('blob_cache_hit', 'shoald', 'n')}) | {_fmt(s, 2)} | "
        f"iperf3 1-stream {_fmt(ip, 2)} | {_fmt(r_ip, 2)} | ≥ 0.95 of iperf3 | "
        f"{'yes' if r_ip is not None and r_ip >= 0.95 else 'no'} |"
    )
    lines.append(
        f"| cache-hit blob GET, GB/s | {_fmt(s, 2)} | docker-registry {_fmt(reg, 2)} | {_fmt(r_reg, 2)} | – | – |"
    )

    sc, rc = g("blob_cache_hit", "shoald", "server_cpu_cores"), g("blob_cache_hit", "registry", "server_cpu_cores")
    lines.append(
        f"| cache-hit blob GET, server CPU (cores busy) | {_fmt(sc, 2)} | docker-registry {_fmt(rc, 2)} | "
        f"{_fmt(ratio(sc, rc), 2)} | – | – |"
    )

    # 2. Manifest by digest.
    for c in (1, 64):
        t = f"manifest_digest_c{c}"
        srps, rrps = g(t, "shoald", "rps"), g(t, "registry", "rps")
        sp50, rp50 = g(t, "shoald", "p50_ms"), g(t, "registry", "p50_ms")
        sp99, rp99 = g(t, "shoald", "p99_ms"), g(t, "registry", "p99_ms")
        r = ratio(srps, rrps)
        if c == 64:
            goal, met = "≥ 20× registry req/s", (r is not None and r >= 20)
        else:
            goal, met = "–", None
        nn = g(t, "shoald", "n") or 1
        secs = g(t, "shoald", "seconds")
        lines.append(
            f"| manifest by digest c={c}, req/s (median of {nn} × {secs} s) | {_fmt(srps, 0)} | docker-registry {_fmt(rrps, 0)} | "
            f"{_fmt(r, 2)}× | {goal} | {'–' if met is None else ('yes' if met else 'no')} |"
        )
        lines.append(
            f"| manifest by digest c={c}, server CPU (cores busy) | {_fmt(g(t, 'shoald', 'server_cpu_cores'), 2)} | "
            f"{_fmt(g(t, 'registry', 'server_cpu_cores'), 2)} | – | – | – |"
        )
        lines.append(
            f"| manifest by digest c={c}, p50 ms | {_fmt(sp50)} | {_fmt(rp50)} | {_fmt(ratio(sp50, rp50), 2)} | – | – |"
        )
        if c == 1:
            goal, met = "p99 < 1 ms", (sp99 is not None and sp99 < 1.0)
        else:
            goal, met = "–", None
        lines.append(
            f"| manifest by digest c={c}, p99 ms | {_fmt(sp99)} | {_fmt(rp99)} | {_fmt(ratio(sp99, rp99), 2)} | "
            f"{goal} | {'–' if met is None else ('yes' if met else 'no')} |"
        )

    # Floor: the same server loop with no content work, same run.
    t = "floor_base_c1"
    fp99, mp99 = g(t, "shoald", "p99_ms"), g("manifest_digest_c1", "shoald", "p99_ms")
    lines.append(
        f"| floor: shoald `GET /v2/` c=1, req/s · p50 · p99 ms | {_fmt(g(t, 'shoald', 'rps'), 0)} · "
        f"{_fmt(g(t, 'shoald', 'p50_ms'))} · {_fmt(fp99)} | – | manifest p99 / floor p99 = {_fmt(ratio(mp99, fp99), 2)} | – | – |"
    )

    # 3. Tag resolution.
    t = "manifest_tag_c1"
    srps, rrps = g(t, "shoald", "rps"), g(t, "registry", "rps")
    lines.append(
        f"| manifest by tag c=1, req/s | {_fmt(srps, 0)} | docker-registry {_fmt(rrps, 0)} | "
        f"{_fmt(ratio(srps, rrps), 2)}× | – (origin asked each time) | – |"
    )
    lines.append(
        f"| manifest by tag c=1, p50 / p99 ms | {_fmt(g(t, 'shoald', 'p50_ms'))} / {_fmt(g(t, 'shoald', 'p99_ms'))} | "
        f"{_fmt(g(t, 'registry', 'p50_ms'))} / {_fmt(g(t, 'registry', 'p99_ms'))} | "
        f"{_fmt(ratio(g(t, 'shoald', 'p50_ms'), g(t, 'registry', 'p50_ms')), 2)} (p50) | – | – |"
    )

    # 4. Cold pass-through.
    st, dt = g("cold_blob", "shoald", "median_s"), g("cold_blob", "registry", "median_s")
    r = ratio(st, dt)
    ob = g("cold_blob", "shoald", "origin_bytes")
    size = meta.get("blob_bytes")
    ob_txt = "–"
    if isinstance(ob, list) and ob:
        ob_txt = ", ".join(f"{b / size:.3f}×" if size else str(b) for b in ob)
    lines.append(
        f"| cold blob GET, s (median of {g('cold_blob', 'shoald', 'n')}) | {_fmt(st)} | direct {_fmt(dt)} | "
        f"{_fmt(r, 3)}× | ≤ 1.05× | {'yes' if r is not None and r <= 1.05 else 'no'} |"
    )
    lines.append(f"| cold: origin bytes / blob size per shoald run | {ob_txt} | – | – | 1.000× | "
                 f"{'yes' if isinstance(ob, list) and ob and size and all(b == size for b in ob) else 'no'} |")
    st, dt = g("cold_blob_wan", "shoald", "median_s"), g("cold_blob_wan", "registry", "median_s")
    if st is not None:
        r = ratio(st, dt)
        rate = g("cold_blob_wan", "shoald", "origin_rate_mib_s")
        lines.append(
            f"| cold blob GET, origin paced to {rate} MiB/s, s (median of {g('cold_blob_wan', 'shoald', 'n')}) | "
            f"{_fmt(st)} | direct {_fmt(dt)} | {_fmt(r, 3)}× | ≤ 1.05× | {'yes' if r is not None and r <= 1.05 else 'no'} |"
        )
    print("\n".join(lines))


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    cmd, rest = a[0], a[1:]
    if cmd == "free-ports":
        free_ports(int(rest[0]))
    elif cmd == "manifest":
        manifest(*rest)
    elif cmd == "iperf-gbps":
        iperf_gbps(rest[0])
    elif cmd == "wrk":
        wrk(rest[0])
    elif cmd == "metric":
        metric(*rest)
    elif cmd == "median":
        median(rest)
    elif cmd == "record":
        record(rest[0], rest[1:])
    elif cmd == "throttle-proxy":
        throttle_proxy(*rest)
    elif cmd == "aggregate-wrk":
        aggregate_wrk(*rest)
    elif cmd == "table":
        table(*rest)
    else:
        sys.exit(f"unknown subcommand {cmd}\n{__doc__}")


if __name__ == "__main__":
    main()
