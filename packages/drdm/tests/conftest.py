from pathlib import Path

import pytest
import torch

REF = Path(__file__).resolve().parents[3] / ".." / "shared" / "reference" / "drdm"


@pytest.fixture(autouse=True)
def _one_thread():
    # 1 thread is much faster than 2 for these small nets on a shared 2-core box (spec section 5)
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ref() -> Path:
    if not REF.is_dir():
        pytest.skip(f"reference fixtures not found at {REF}")
    return REF


@pytest.fixture(scope="session")
def official_net(ref):
    from drdm.model import RecResACNet

    path = ref / "cmr_recresacnet.pth"
    if not path.is_file():
        pytest.skip("cmr_recresacnet.pth missing")
    net = RecResACNet(n_steps=80, ndims=2)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def source_image(ref):
    from drdm.data import to_tensor_layout
    from medsynth_core.io import read_image

    path = ref / "cmr" / "OpenDataset_162867.nii.gz"
    if not path.is_file():
        pytest.skip("CMR source sample missing")
    arr = to_tensor_layout(read_image(path).array)
    return torch.from_numpy(arr).float()[None, None]
