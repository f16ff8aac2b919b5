#!/usr/bin/env python3
"""Writes a small OCI image layout with incompressible layers (for the demo).

usage: make-image.py DIR TAG LAYERS LAYER_MIB
Each layer is an uncompressed tar holding one file of random bytes, so the
image can be unpacked by any runtime and nothing compresses it away.
"""
import hashlib, io, json, os, sys, tarfile

def blob(root, data):
    d = hashlib.sha256(data).hexdigest()
    with open(os.path.join(root, "blobs", "sha256", d), "wb") as f:
        f.write(data)
    return "sha256:" + d, len(data)

def main():
    root, tag, layers, mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    descs = []
    for i in range(layers):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            payload = os.urandom(mib << 20)
            info = tarfile.TarInfo(f"shoal-demo/layer{i}.bin")
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            t.addfile(info, io.BytesIO(payload))
        d, n = blob(root, buf.getvalue())
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": n})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in descs]},
    }).encode()
    cd, cn = blob(root, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cn},
        "layers": descs,
    }).encode()
    md, mn = blob(root, manifest)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mn,
            "annotations": {"org.opencontainers.image.ref.name": tag},
            "platform": {"architecture": "amd64", "os": "linux"}}]}, f)
    print(md)

if __name__ == "__main__":
    main()
