"""Build hook: compile the containerd API messages from their .proto at build time.

Everything else about the package is declared in setup.cfg. The generated
containerd_api_pb2.py/.pyi are not kept in the repository: protoc (from
grpcio-tools, pinned in pyproject.toml's build requirements) writes them into
the build tree, or beside the .proto for an editable install.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PROTO_PACKAGE = os.path.join("registryd", "storage", "containerd", "proto")
PROTO_FILE = "containerd_api.proto"


def compile_protos(out_dir: str) -> None:
    """protoc the .proto into out_dir; a failure stops the build with protoc's message."""
    import grpc_tools
    from grpc_tools import protoc

    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), PROTO_PACKAGE)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    os.makedirs(out_dir, exist_ok=True)
    # protoc names the module after the path it was given: run it beside the .proto.
    status = protoc.main(["protoc", f"-I{source}", f"-I{well_known}", f"--python_out={out_dir}",
                          f"--pyi_out={out_dir}", os.path.join(source, PROTO_FILE)])
    if status != 0:
        raise SystemExit(f"protoc failed on {PROTO_PACKAGE}/{PROTO_FILE} (status {status})")


class BuildPyWithProtos(build_py):
    """build_py that also generates the containerd messages."""

    def run(self) -> None:
        super().run()
        # An editable install imports from the source tree, so the modules go there.
        target = PROTO_PACKAGE if self.editable_mode else os.path.join(self.build_lib, PROTO_PACKAGE)
        compile_protos(target)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        outputs = list(super().get_outputs(include_bytecode))
        if not self.editable_mode:
            base = os.path.join(self.build_lib, PROTO_PACKAGE, "containerd_api_pb2")
            outputs += [base + ".py", base + ".pyi"]
        return outputs


setup(cmdclass={"build_py": BuildPyWithProtos})
