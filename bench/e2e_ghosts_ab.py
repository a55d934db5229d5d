"""The 2,000-trial study of bench/bench_e2e.py with ghost rows on or off (v19's A/B).

    python bench/e2e_ghosts_ab.py on|off --device cuda --data-dir DIR --precision bf16 [bench_e2e options]

``off`` empties ``core._population._GHOSTS_ON``, so that every member that ends leaves its
stack at once (a new stack: new graphs, the next epoch staged again), as before v19; ``on``
runs the code as it is. Alternate the two in one machine session: single runs of the study
spread by several seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import _population as P  # noqa: E402

if __name__ == "__main__":
    mode = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if mode not in ("on", "off"):
        print("usage: e2e_ghosts_ab.py on|off [bench_e2e options]", file=sys.stderr)
        sys.exit(2)
    if mode == "off":
        P._GHOSTS_ON = ()
    print(f"## ghosts {mode}: _GHOSTS_ON={P._GHOSTS_ON}", flush=True)
    import bench_e2e

    counts = {"ended": 0, "kept": 0, "restacks": 0}
    retire = P._Population._retire

    def counted(self: P._Population, ended: set) -> None:
        before = self.stack
        retire(self, ended)
        counts["ended"] += len(ended)
        if self.stack is before:
            counts["kept"] += len(ended)
        else:
            counts["restacks"] += 1

    P._Population._retire = counted
    bench_e2e.main()
    print(f"## members that ended mid-stack {counts['ended']}, left as ghosts {counts['kept']}; "
          f"stacks made smaller or emptied {counts['restacks']}", flush=True)
