"""Regenerate ``bench/results/aot.md``, the AOT compile gate's table: ``python bench/aot_table.py``.

Compiles every registered kernel x GPU config x dtype for sm_80 and sm_90 (cached, see
``tritonkit.aot``) and writes registers, shared memory, spills and tensor-core use per row. Exits 1
when the gate finds problems (the table is written anyway, with those rows marked FAIL).
"""

import sys
from pathlib import Path

from tritonkit.cli import main

TABLE = Path(__file__).resolve().parent / "results" / "aot.md"

if __name__ == "__main__":
    sys.exit(main(["inspect", "--table", "--output", str(TABLE)]))
