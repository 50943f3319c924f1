import json

import pytest
import torch

from drdm.config import DRDMConfig, build_network, constructor_to_config
from drdm.model import RecResACNet, sinusoid_table
from medsynth_core.training import count_parameters


@pytest.mark.parametrize("nd,total,trainable", [(2, 443_435, 435_435), (3, 1_313_646, 1_305_646)])
def test_parameter_counts(nd, total, trainable):
    net = RecResACNet(n_steps=80, ndims=nd)
    assert count_parameters(net) == {"total": total, "trainable": trainable}
    assert len(net.state_dict()) == 193


def test_official_checkpoint_loads_strict(ref):
    sd = torch.load(ref / "cmr_recresacnet.pth", map_location="cpu", weights_only=True)
    net = RecResACNet(80, ndims=2)
    own = net.state_dict()
    assert list(sd) == list(own)  # same keys, same module order (spec section 6)
    assert all(sd[k].shape == own[k].shape for k in own)
    net.load_state_dict(sd, strict=True)
    # checklist 2: the generated embedding equals the checkpoint's exactly
    assert torch.equal(sinusoid_table(80, 100), sd["time_embed.weight"])


def test_sinusoid_uses_4k_over_d():
    tab = sinusoid_table(80, 100)
    assert tab[3, 2 * 5].item() == pytest.approx(
        torch.sin(torch.tensor(3 * 10000 ** (-20 / 100))).item(), abs=1e-6
    )
    assert tab[3, 2 * 5 + 1].item() == pytest.approx(
        torch.cos(torch.tensor(3 * 10000 ** (-20 / 100))).item(), abs=1e-6
    )


def test_official_keys_paper_map(ref):
    keys = json.loads((ref / "official_keys_paper.json").read_text())
    for name, entry in keys.items():
        mc = constructor_to_config(entry["constructor"])
        cfg = DRDMConfig()
        cfg.model = mc
        net = build_network(cfg, n_steps=entry["constructor"]["n_steps"])
        own = {k: list(v.shape) for k, v in net.state_dict().items()}
        assert own == {k: list(v) for k, v in entry["state_dict"].items()}, name
        assert count_parameters(net)["total"] == entry["num_params"]
        assert count_parameters(net)["trainable"] == entry["num_trainable_params"]


@pytest.mark.parametrize(
    "fname,entry",
    [("official_tiny.pt", "recresacnet_2d_cmr"), ("official_tiny_3d.pt", "recresacnet_3d_random")],
)
def test_official_tiny_outputs(ref, fname, entry):
    fx = torch.load(ref / fname, map_location="cpu", weights_only=True)[entry]
    cfg = DRDMConfig()
    cfg.model = constructor_to_config(fx["constructor"])
    net = build_network(cfg, n_steps=fx["constructor"]["n_steps"])
    net.load_state_dict(fx["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        for r, key in ((2, "ddf_rec2"), (1, "ddf_rec1")):
            out = net(fx["inputs"]["x"], fx["inputs"]["t"], rec_num=r)
            torch.testing.assert_close(
                out, fx["outputs"][key], rtol=1e-4, atol=1e-5
            )  # reference README (AVX2 CPUs differ by 4.3e-6)


@torch.no_grad()
def test_fingerprint_source_sample(official_net, source_image):
    """Checklist 3: official weights on OpenDataset_162867 (rel. tol 1e-4)."""
    x = source_image
    o = official_net(x, torch.tensor([0]), rec_num=1)
    assert o.sum().item() == pytest.approx(-6.81775, rel=1e-4)
    assert o.abs().mean().item() == pytest.approx(4.20841e-4, rel=1e-4)
    o = official_net(x, torch.tensor([40]), rec_num=2)
    assert o.sum().item() == pytest.approx(366.81421, rel=1e-4)
    assert o.abs().mean().item() == pytest.approx(5.63199e-3, rel=1e-4)
    assert o[0, :, 128, 128].tolist() == pytest.approx([0.0095609, -0.0016516], rel=1e-3)
    o = official_net(x, torch.tensor([79]), rec_num=2)
    assert o.sum().item() == pytest.approx(325.03708, rel=1e-4)
    assert o.abs().mean().item() == pytest.approx(4.44676e-3, rel=1e-4)


def test_bad_input_shapes():
    net = RecResACNet(80, ndims=2)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 1, 12, 12), torch.tensor([1]))
    with pytest.raises(ValueError, match="expects"):
        net(torch.rand(1, 2, 16, 16), torch.tensor([1]))
