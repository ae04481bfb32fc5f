"""Expose the third-party .proto files our contracts import to buf, from installed wheels.

buf has no include path and cannot reach the Buf Schema Registry here, so `make proto`
links the `google/api` and `google/rpc` directories shipped by googleapis-common-protos
into `.build/protodeps/` (git-ignored), which buf.yaml declares as a dependency module.
Nothing third-party is copied into the repository.
"""

from __future__ import annotations

import sys
from pathlib import Path

import google.api
import google.rpc

PACKAGES = {"api": google.api, "rpc": google.rpc}


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else ".build/protodeps") / "google"
    target.mkdir(parents=True, exist_ok=True)
    for name, module in PACKAGES.items():
        source = Path(next(iter(module.__path__))).resolve()
        link = target / name
        if link.is_symlink() and link.resolve() == source:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source, target_is_directory=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
