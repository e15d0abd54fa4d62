"""Install the wheels in a folder whose distributions are not installed yet (--no-deps).

The GPU machine lacks langgraph, SQLAlchemy and structlog but has torch and its
dependencies; installing every downloaded wheel would replace packages torch
was built against. Usage: python3 scripts/install_missing_wheels.py .wheels
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".wheels")
    missing = []
    for wheel in sorted(folder.glob("*.whl")):
        dist = wheel.name.split("-")[0]
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(wheel))
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--break-system-packages", "-q",
                        *missing], check=True)
    print(f"installed {len(missing)} missing wheel(s) from {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
