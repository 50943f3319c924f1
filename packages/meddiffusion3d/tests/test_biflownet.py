"""BiFlowNet (spec §2; checklist items 8–10) and the official-checkpoint mapping."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from meddiffusion3d.biflownet import (
    CLASS_NAMES,
    OFFICIAL_LATENT_SHAPES,
    BiFlowNet,
    count_parameters_meta,
    resolution_code,
    sincos_pos_embed_3d,
    timestep_embedding,
)
from meddiffusion3d.convert import (
    convert_official_biflownet,
    convert_official_biflownet_checkpoint,
    from_official_kwargs,
    official_args_to_kwargs,
)

sys.path.insert(0, str(Path(__file__).parent))
from md3d_testutils import BIFLOW_DEMO as DEMO  # noqa: E402
from md3d_testutils import BIFLOW_PAPER_STRUCTURE as PAPER_STRUCTURE
from md3d_testutils import REF


def _randomize(net: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _inputs(shape, channels, batch=1, classes=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, *shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.arange(batch) % 2 if classes else None
    return x, t, y, resolution_code(shape, batch)


# ----------------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("patch", [1, 2])
@pytest.mark.parametrize("shape", [(8, 16, 24), (16, 16, 16), (24, 24, 24), (8, 40, 40), (16, 32, 32)])
def test_output_shape_equals_input(shape, patch):
    torch.manual_seed(0)
    net = BiFlowNet(**PAPER_STRUCTURE, dit_patch=patch).eval()
    _randomize(net)  # DiT path active
    x, t, y, res = _inputs(shape, 8)
    with torch.no_grad():
        out = net(x, t, y=y, res=res)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(8, 8, 12), (4, 8, 8), (16, 16, 20)])
def test_shapes_not_divisible_by_8_raise(shape):
    net = BiFlowNet(**PAPER_STRUCTURE)
    x, t, y, res = _inputs(shape, 8)
    with pytest.raises(ValueError, match="divisible by"):
        net(x, t, y=y, res=res)


def test_wrong_channels_raise():
    net = BiFlowNet(**DEMO)
    x, t, y, res = _inputs((8, 8, 8), 3)
    with pytest.raises(ValueError, match="expects a latent"):
        net(x, t, y=y, res=res)


def test_sub_volume_tiling_round_trip_non_cubic():
    """_to_sub_volumes / token unpatchify re-tile (D, H, W) exactly, also for patch 2 and a non-cubic grid."""
    net = BiFlowNet(**{**PAPER_STRUCTURE, "dit_patch": 2})
    b, c, shape = 2, net.dim, (8, 16, 24)
    vol = torch.randn(b, c, *shape)
    subs = net._to_sub_volumes(vol)  # (B·n_sub, C, 8, 8, 8)
    assert subs.shape == (b * 1 * 2 * 3, c, 8, 8, 8)
    torch.testing.assert_close(subs[1], vol[0, :, 0:8, 0:8, 8:16], rtol=0, atol=0)  # raster (D, H, W) order
    p, g = 2, 4
    # patchify like the DiT tokens: (N, g, g, g, p, p, p, C)
    tok = (
        subs.reshape(-1, c, g, p, g, p, g, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(subs.shape[0], g**3, -1)
    )
    back = net._from_tokens(tok, b, (1, 2, 3))
    torch.testing.assert_close(back, vol, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------- item 9
def test_parameter_counts_paper():
    assert count_parameters_meta() == 157_654_880
    assert count_parameters_meta(dit_patch=2) == 157_773_824
    with torch.device("meta"):
        n1, n2 = BiFlowNet(dit_patch=1), BiFlowNet(dit_patch=2)
    assert n1.dit_parameters() == 1_934_856
    assert n2.dit_parameters() == 2_082_024
    assert n1.pos_embed.numel() == 36_864 and not n1.pos_embed.requires_grad
    assert n2.pos_embed.numel() == 4_608


def test_parameter_count_demo():
    assert count_parameters_meta(**DEMO) == 430_168  # spec §8 "≈ 0.43 M", fixture num_params


# ----------------------------------------------------------------------------------------------- item 10
def test_dit_path_adds_exactly_zero_at_init():
    torch.manual_seed(1)
    net = BiFlowNet(**DEMO).eval()
    x, t, y, res = _inputs((8, 8, 8), 4, batch=2)
    with torch.no_grad():
        ref = net(x, t, y=y, res=res)
        for stage in [*net.dit_in, *net.dit_out]:
            for p in stage.block.parameters():
                p.add_(torch.randn_like(p))
        for blk in net.dit_mid:
            for p in blk.parameters():
                p.add_(torch.randn_like(p))
        out = net(x, t, y=y, res=res)
        f_in, f_out = net.intra_patch_flow(x, net.condition(t, y, res))
    assert torch.equal(out, ref)
    assert all(torch.count_nonzero(f) == 0 for f in [*f_in, *f_out])


def test_dit_features_are_local_to_sub_volumes():
    torch.manual_seed(2)
    net = BiFlowNet(**DEMO).eval()
    _randomize(net, std=0.1)  # non-zero FinalLayers
    x, t, y, res = _inputs((8, 8, 8), 4)
    x2 = x.clone()
    x2[:, :, 4:8, 0:4, 4:8] += torch.randn(1, 4, 4, 4, 4)  # edit one 4³ sub-volume
    with torch.no_grad():
        c = net.condition(t, y, res)
        fa, fb = net.intra_patch_flow(x, c), net.intra_patch_flow(x2, c)
    inside = torch.zeros(8, 8, 8, dtype=torch.bool)
    inside[4:8, 0:4, 4:8] = True
    for a, b in zip([*fa[0], *fa[1]], [*fb[0], *fb[1]], strict=True):
        diff = (a - b).abs().amax(dim=(0, 1))
        assert diff[inside].min() > 0
        assert diff[~inside].max() == 0


def test_class_and_resolution_change_the_output():
    torch.manual_seed(3)
    net = BiFlowNet(**DEMO).eval()
    _randomize(net)
    x, t, _, res = _inputs((8, 8, 8), 4)
    with torch.no_grad():
        a = net(x, t, y=torch.tensor([0]), res=res)
        b = net(x, t, y=torch.tensor([1]), res=res)
        c = net(x, t, y=torch.tensor([0]), res=res * 2)
    assert (a - b).abs().max() > 1e-4
    assert (a - c).abs().max() > 1e-4
    with pytest.raises(ValueError, match="pass y"):
        net(x, t, res=res)
    with pytest.raises(ValueError, match="out of range"):
        net(x, t, y=torch.tensor([2]), res=res)


def test_unconditional_and_no_res_condition_build_and_run():
    """The official code crashes with res_condition=False (spec §6 item 7); ours drops the resolution MLP."""
    net = BiFlowNet(**{**DEMO, "classes": None, "res_condition": False})
    assert net.cond_dim == 4 * 12 and net.res_mlp is None and net.class_embed is None
    x, t, _, _ = _inputs((8, 8, 8), 4)
    assert net(x, t).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        net(x, t, y=torch.tensor([0]))


def test_time_embedding_layout():
    e = timestep_embedding(torch.tensor([0, 7]), 72)
    assert e.shape == (2, 72)
    torch.testing.assert_close(e[0, :36], torch.zeros(36))
    torch.testing.assert_close(e[0, 36:], torch.ones(36))
    k = torch.arange(36)
    torch.testing.assert_close(e[1, :36], torch.sin(7 * torch.exp(-torch.log(torch.tensor(1e4)) * k / 35)))


def test_pos_embed_needs_dim_divisible_by_6():
    assert sincos_pos_embed_3d(72, (8, 8, 8)).shape == (512, 72)
    with pytest.raises(ValueError, match="divisible by 6"):
        BiFlowNet(**{**DEMO, "dim": 16, "resnet_groups": 4})


def test_official_kwargs_aliases_and_vq_size_check():
    kw = from_official_kwargs(
        **{
            "model-dim": 72,
            "volume-channels": 8,
            "num-classes": 7,
            "patch_size": 1,
            "use-attn": [0, 0, 0, 1, 1],
            "num-dit": 1,
            "vq-size": 64,
        }
    )
    assert kw["dim"] == 72 and kw["channels"] == 8 and kw["classes"] == 7 and kw["dit_patch"] == 1
    with pytest.raises(ValueError, match="vq_size"):
        from_official_kwargs(dim=12, sub_volume_size=(4, 4, 4), vq_size=64)
    with pytest.raises(ValueError, match="unknown"):
        from_official_kwargs(dim=12, bogus=1)


# ----------------------------------------------------------------------------------------------- fixtures
def _need(name: str) -> Path:
    p = REF / name
    if not p.exists():
        pytest.skip(f"official fixture {p} not available")
    return p


@pytest.mark.parametrize("entry", ["biflownet_8x", "biflownet_4x"])
def test_official_paper_keys_and_shapes_map(entry):
    d = json.loads(_need("official_keys_paper.json").read_text())[entry]
    kw = from_official_kwargs(**d["constructor"])
    with torch.device("meta"):
        net = BiFlowNet(**kw)
    assert sum(p.numel() for p in net.parameters()) == d["num_params"]
    mapped, unmapped = convert_official_biflownet(d["state_dict"])
    assert unmapped == []
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert set(mapped) == set(ours)
    assert all(list(mapped[k]) == ours[k] for k in ours)


def test_official_tiny_outputs_reproduce():
    fx = torch.load(_need("official_tiny.pt"), map_location="cpu", weights_only=True)["biflownet"]
    net = BiFlowNet(**from_official_kwargs(**fx["constructor"])).eval()
    assert sum(p.numel() for p in net.parameters()) == fx["num_params"]
    sd, unmapped = convert_official_biflownet(fx["state_dict"])
    assert unmapped == []
    net.load_state_dict(sd, strict=True)
    i, o = fx["inputs"], fx["outputs"]
    with torch.no_grad():
        eps = net(i["x"], i["time"], y=i["y"], res=i["res"])
        tm = net.time_mlp(i["time"])
    torch.testing.assert_close(tm, o["time_mlp"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps, o["eps"], rtol=1e-4, atol=1e-4)


def test_convert_reports_foreign_keys():
    sd, unmapped = convert_official_biflownet(
        {"module.init_conv.weight": 1, "something.else": 2, "downs.0.9.weight": 3}
    )
    assert sd == {"stem.weight": 1}
    assert unmapped == ["something.else", "downs.0.9.weight"]


def test_official_training_checkpoint_conversion():
    fx = torch.load(_need("official_tiny.pt"), map_location="cpu", weights_only=True)["biflownet"]
    c = fx["constructor"]
    args = argparse.Namespace(
        model_dim=c["dim"],
        dim_mults=c["dim_mults"],
        use_attn=c["use_sparse_linear_attn"],
        volume_channels=c["channels"],
        num_classes=c["cond_classes"],
        num_dit=c["num_mid_DiT"],
        vq_size=64,  # the script's sub-volume is the class default 8³; the tiny weights use 4³ (overridden below)
        patch_size=c["patch_size"],
        timesteps=1000,
        loss_type="l1",
        lr=1e-4,
    )
    ckpt = {"model": fx["state_dict"], "ema": fx["state_dict"], "args": args, "opt": {}, "epoch": 3}
    out = convert_official_biflownet_checkpoint(ckpt)
    assert out["unmapped"] == [] and out["diffusion_kwargs"] == {"timesteps": 1000, "loss": "l1"}
    # argparse-built models use the class defaults for heads/groups/sub-volume; the tiny fixture overrides them
    kw = {**out["model_kwargs"], "attn_heads": 2, "resnet_groups": 4, "dit_heads": 2, "sub_volume": (4, 4, 4)}
    net = BiFlowNet(**kw)
    net.load_state_dict(out["ema"], strict=True)
    paper_kw, _ = official_args_to_kwargs({})
    assert paper_kw == from_official_kwargs(**{**_PAPER_CONSTRUCTOR, "patch_size": 1})


_PAPER_CONSTRUCTOR = {
    "dim": 72,
    "dim_mults": [1, 1, 2, 4, 8],
    "channels": 8,
    "init_kernel_size": 3,
    "cond_classes": 7,
    "learn_sigma": False,
    "use_sparse_linear_attn": [0, 0, 0, 1, 1],
    "vq_size": 64,
    "num_mid_DiT": 1,
}


@pytest.mark.parametrize("ratio,patch", [("8x", 1), ("4x", 2)])
def test_official_eval_latent_shapes_are_accepted(ratio, patch):
    with torch.device("meta"):
        net = BiFlowNet(dit_patch=patch)
        for shapes in OFFICIAL_LATENT_SHAPES[ratio].values():
            for shape in shapes:
                net.check_input(torch.empty(1, 8, *shape))
    assert len(CLASS_NAMES) == 7 == len(OFFICIAL_LATENT_SHAPES[ratio])
