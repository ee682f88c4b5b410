#!/bin/sh
# Regenerate the containerd API messages registryd's containerd store uses
# (registryd/storage/containerd/proto/containerd_api_pb2.py and .pyi) from
# containerd_api.proto, with the grpcio-tools pinned in setup.cfg's [test] extra:
#     pip install -e '.[test]' && scripts/gen-containerd-proto.sh
# The generated files are checked in, so installing registryd needs no protoc.
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-"$here/.venv/bin/python"}
cd "$here/registryd/storage/containerd/proto"
"$python" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. containerd_api.proto
