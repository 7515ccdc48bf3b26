import sys
from pathlib import Path

# the tests import their shared helpers (fixture_paths, test_mppca.planted_data) from this folder
sys.path.insert(0, str(Path(__file__).parent))

import atexit
import os
import shutil
import tempfile

# the tables cached between runs (core.tables) go to a folder of this test session, removed at its end, not to the
# user's ~/.cache (the subprocesses the tests start inherit it)
if "PPCASORT_CACHE_DIR" not in os.environ:
    os.environ["PPCASORT_CACHE_DIR"] = tempfile.mkdtemp(prefix="ppcasort-test-cache-")
    atexit.register(shutil.rmtree, os.environ["PPCASORT_CACHE_DIR"], ignore_errors=True)
