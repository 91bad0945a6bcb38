"""``import hookrt`` must stay light: no built-in plugins and no optional heavy packages."""

from __future__ import annotations

import json
import subprocess
import sys

# Modules that `import hookrt` must leave unimported.
LAZY_MODULES = ("hookrt.plugins", "torchvision", "tensorboardX", "tqdm")

PROBE = f"""
import json, sys
import hookrt
print(json.dumps(sorted(name for name in {LAZY_MODULES!r} if name in sys.modules)))
"""


def test_import_leaves_heavy_modules_unloaded():
    # A fresh interpreter, because this test process may have imported any of them already.
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=False)

    assert completed.returncode == 0, completed.stderr
    imported = json.loads(completed.stdout)
    # torch imports tqdm (torch.hub does, in torch 2.x), so an eager `import torch` also fails this test.
    assert imported == [], f"`import hookrt` imported {imported}; import them where they are first needed"
