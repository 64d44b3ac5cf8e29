#!/usr/bin/env bash
# Prepares a run on a machine without a Rust toolchain or Redis (the lent 16-core device):
# builds the cluster and phone benches in release here, copies their executables into
# .device/bin, and redis-server and redis-cli with the libraries they link (all but the C
# library's own) into .device/redis, each behind a wrapper of its name that finds them. Carry `.device` and
# run benches/scripts/device_run.sh there. x86-64 only, and the other machine's C library
# must be at least as new as this one's (this VM: glibc 2.36).
set -euo pipefail
cd "$(dirname "$0")/../.."

BENCHES=${BENCHES:-relay_cluster machine_pauses phone_shape}
args=()
for b in $BENCHES; do args+=(--bench "$b"); done
cargo bench -p pabal-benches "${args[@]}" --no-run --message-format=json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' > .device.list
rm -rf .device && mkdir -p .device/bin .device/redis/lib
while read -r name exe; do cp "$exe" ".device/bin/$name"; done < .device.list
rm -f .device.list
strip .device/bin/* 2>/dev/null || true

# redis-server, and redis-cli (the test kit asks Redis through it), each behind a wrapper.
for tool in redis-server redis-cli; do
  path=$(command -v "$tool")
  cp "$(readlink -f "$path")" ".device/redis/$tool.bin"
  ldd "$path" | awk '$3 ~ /^\// { print $3 }' |
    grep -v -E '/(libc|libm|libpthread|libdl|librt)\.so' |
    while read -r lib; do cp -L "$lib" .device/redis/lib/; done
  cat > ".device/redis/$tool" <<WRAP
#!/bin/sh
here=\$(dirname "\$(readlink -f "\$0")")
LD_LIBRARY_PATH="\$here/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$here/$tool.bin" "\$@"
WRAP
  chmod +x ".device/redis/$tool"
done
du -sh .device/bin/* .device/redis
