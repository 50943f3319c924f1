from pathlib import Path

import pytest

REF = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "mgdcr"


@pytest.fixture
def ref_dir() -> Path:
    if not REF.is_dir():
        pytest.skip("reference fixtures (../shared/reference/mgdcr) not available")
    return REF
