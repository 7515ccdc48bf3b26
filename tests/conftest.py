import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The GPL test fixtures in ../shared/data (read in place, never copied into the package)."""
    if not SHARED_DATA.is_dir():
        raise FileNotFoundError(f"test fixtures not found at {SHARED_DATA}: clone the project beside ../shared")
    return SHARED_DATA
