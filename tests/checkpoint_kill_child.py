"""Child process for test_checkpoint's kill-mid-save tests (not a test module).

usage: python checkpoint_kill_child.py DIRECTORY MODE MARKER [FLOATS]

Restores the latest step of DIRECTORY and starts saving it again as the next step, with an extra
array of FLOATS random float32 values (default 32M = 128 MB) so the save takes a while. The parent
SIGKILLs this process part-way:
  MODE "writing": the parent kills as soon as the files of the new step start to appear;
  MODE "commit":  every item is written, and Orbax's final step rename (the commit) is held back
                  here until the parent, told through the file MARKER, kills the process - the
                  latest possible moment, deterministically.
Should the save finish anyway, MARKER + ".done" receives the step number.
"""

import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    directory, mode, marker = Path(sys.argv[1]).absolute(), sys.argv[2], Path(sys.argv[3])
    n = int(sys.argv[4]) if len(sys.argv) > 4 else 32 * 2**20
    if mode == "commit":
        from orbax.checkpoint._src.path import atomicity

        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def held_back(self):
            if Path(self.get_final()).parent == directory:  # the step's rename, not an item's
                marker.write_text(str(self.get()))
                time.sleep(600)  # killed here
            return await finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = held_back
    elif mode != "writing":
        raise SystemExit(f"unknown mode {mode!r}")

    from mixllm_jax.store import checkpoint

    router, _ = checkpoint.restore_router(directory, encoder=None)
    big = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    step = checkpoint.save_router(router, directory, extras={"big": big})
    Path(str(marker) + ".done").write_text(str(step))


if __name__ == "__main__":
    main()
