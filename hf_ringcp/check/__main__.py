"""``python -m hf_ringcp.check``: see :mod:`hf_ringcp.check`."""

from __future__ import annotations

# Guarded: spawned ranks import this module again (as __mp_main__) and must not rerun the check.
if __name__ == "__main__":
    import sys

    from hf_ringcp.check.cli import main

    sys.exit(main())
