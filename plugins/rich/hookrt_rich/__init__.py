"""Rich progress bar and model summary plugins for hookrt.

Installed, the pack registers two plugin names in the ``hookrt.plugins`` entry
point group: ``rich_progress`` (`RichProgressBar`) and ``rich_summary``
(`RichModelSummary`).
"""

from __future__ import annotations

from hookrt_rich.progress import RichProgressBar
from hookrt_rich.summary import RichModelSummary

__all__ = ["RichModelSummary", "RichProgressBar"]

__version__ = "0.1.0"
