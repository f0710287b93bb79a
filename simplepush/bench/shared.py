"""Where the reference instruments live: pushgo and the Tornado floor, Heka.

They are not part of the product: a `shared/` directory beside the
repository holds them (its peers/ and heka/ READMEs say what each is).
SIMPLEPUSH_SHARED names another place; a checkout elsewhere than beside
it (a clone in /tmp, say) finds the machine's /work/shared.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FALLBACK = Path("/work/shared")


def shared_dir() -> Path:
    """The first of $SIMPLEPUSH_SHARED, <repo>/../shared and /work/shared that exists."""
    named = os.environ.get("SIMPLEPUSH_SHARED")
    if named:
        return Path(named)
    beside = REPO.parent / "shared"
    return beside if beside.is_dir() or not FALLBACK.is_dir() else FALLBACK
