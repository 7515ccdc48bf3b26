import sys
from pathlib import Path

# the tests import their shared helpers (fixture_paths, test_mppca.planted_data) from this folder
sys.path.insert(0, str(Path(__file__).parent))
